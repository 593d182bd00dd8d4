"""Lineage: an artifact and its ancestors, read from the manifests' parent refs.

One walker serves the ``medlm lineage`` tree, the demo's table and the lineage artifacts a run
publishes in the Prefect UI. The store knows nothing about any stage: what a node shows is its
manifest's ``label`` (set by the stage, e.g. a source file's name and md5) and its counts.
"""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from typing import Iterator

from storage.store import Store


@dataclass
class Node:
    ref: str
    label: str | None = None
    params: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    created: float | None = None
    build_seconds: float | None = None  # how long its build ran (None in a manifest without it)
    parents: list["Node"] = field(default_factory=list)
    missing: bool = False
    roles: dict[str, list[str]] = field(default_factory=dict)  # parents' refs by the role the stage read them in

    def role_of(self, parent: "Node") -> str | None:
        """The role ``parent`` was read in (None in a manifest written before roles were kept)."""
        return next((role for role, refs in self.roles.items() if parent.ref in refs), None)

    @property
    def kind(self) -> str:
        return self.ref.split("/", 1)[0]

    def describe(self) -> str:
        """The label if the stage gave one, else the artifact's counts."""
        return self.label or summary_line(self.summary)

    def as_dict(self) -> dict:
        return {
            "ref": self.ref, "label": self.label, "params": self.params, "summary": self.summary,
            "created": self.created, "missing": self.missing, "roles": self.roles, "parents": [p.as_dict() for p in self.parents],
        }


def lineage(store: Store, ref: str) -> Node:
    """``ref`` and its ancestors. Each artifact is read once: a shared ancestor (the corpus under
    both the shards and the tokenizer) is the same node wherever it appears."""
    nodes: dict[str, Node] = {}

    def node(ref: str) -> Node:
        if ref not in nodes:
            m = store.manifest(ref)  # here, or on the remote: lineage fetches no file
            if m is None:
                nodes[ref] = Node(ref, missing=True)
            else:
                parents = [node(p) for p in m.get("parents", [])]
                nodes[ref] = Node(ref, m.get("label"), dict(m.get("params", {})), dict(m.get("summary", {})), m.get("created"),
                                  m.get("build_seconds"), parents, roles=dict(m.get("roles", {})))
        return nodes[ref]

    return node(ref)


def ancestor(root: Node, kind: str) -> Node | None:
    """The nearest ancestor of ``root`` of this kind (breadth first), e.g. a checkpoint's shards."""
    queue, seen = list(root.parents), set()
    while queue:
        node = queue.pop(0)
        if node.kind == kind and not node.missing:
            return node
        if node.ref not in seen:
            seen.add(node.ref)
            queue += node.parents
    return None


def ancestors_first(*roots: Node) -> Iterator[Node]:
    """Every node under ``roots`` once, each after all of its parents."""
    seen: set[str] = set()

    def visit(node: Node) -> Iterator[Node]:
        if node.ref in seen:
            return
        seen.add(node.ref)
        for parent in _display_order(node.parents):
            yield from visit(parent)
        yield node

    for root in roots:
        yield from visit(root)


def tree_lines(root: Node, most: int | None = None, width: int | None = None) -> list[str]:
    """An indented tree (``medlm lineage``); a subtree already shown is named, not repeated. With
    ``most``, a node with more parents shows the first and last of them and how many it leaves
    out; with ``width``, each artifact's detail is cut to that many characters."""
    lines: list[str] = []
    seen: set[str] = set()

    def walk(node: Node, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        name = node.ref + (" (missing from the store)" if node.missing else "")
        detail = _short(node.describe(), width) if width else node.describe()
        repeated = node.ref in seen and node.parents
        lines.append(prefix + branch + name + (f"  {detail}" if detail else "") + ("  (see above)" if repeated else ""))
        if repeated:
            return
        seen.add(node.ref)
        child_prefix = prefix + ("" if top else ("    " if last else "│   "))
        parents = _display_order(node.parents)
        if most is not None and len(parents) > most:
            left_out = len(parents) - most
            parents = parents[: most - 1] + [Node(f"... {left_out:,} more", label="in the JSON below")] + parents[-1:]
        for i, parent in enumerate(parents):
            walk(parent, child_prefix, i == len(parents) - 1, False)

    walk(root, "", True, True)
    return lines


def table(*roots: Node) -> str:
    """One line per artifact behind ``roots``, parents first, with its counts (the demo's table)."""
    nodes = list(ancestors_first(*roots))
    width = max(len(n.ref) for n in nodes)
    return "\n".join(f"{n.ref:<{width}}  {summary_line(n.summary, numbers_only=True)}" for n in nodes)


def stage_times(*roots: Node, since: float) -> str:
    """One line per stage (artifact kind) behind ``roots``, in pipeline order: how many of its
    artifacts were built after ``since`` and the seconds their builds took, or ``cached`` when the
    store already had them all (the demo's closing table: where a run's time went)."""
    by_kind: dict[str, list[Node]] = {}
    for node in ancestors_first(*roots):
        by_kind.setdefault(node.kind, []).append(node)
    width = max(len(kind) for kind in by_kind)
    lines = []
    for kind, nodes in by_kind.items():
        built = [n for n in nodes if n.created is not None and n.created >= since]
        cached = len(nodes) - len(built)
        if built:
            seconds = sum(n.build_seconds or 0.0 for n in built)
            counts = f"{len(built)} built" + (f", {cached} cached" if cached else "")
            lines.append(f"{kind:<{width}}  {seconds:7.1f} s  {counts}")
        else:
            lines.append(f"{kind:<{width}}   cached    ({cached} in the store)")
    return "\n".join(lines)


def summary_line(summary: dict, numbers_only: bool = False) -> str:
    """An artifact's counts as ``key=value`` words (lists and nested stats left out)."""
    kinds = (int, float) if numbers_only else (int, float, str)
    return ", ".join(f"{k}={_number(k, v)}" for k, v in summary.items() if isinstance(v, kinds) and not isinstance(v, bool))


def _number(name: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value) if name.endswith("seq") else f"{value:,}"
    return str(value)


def _display_order(nodes: list[Node]) -> list[Node]:
    """Parents as people read them: by label (source files in NCBI's order), then ref."""
    return sorted(nodes, key=lambda n: (n.label or "", n.ref))


# -- for people: markdown (the Prefect UI), Graphviz, and the difference between two ancestries -------------

MANY = 12  # a kind with more artifacts than this is summarised in markdown, listed whole in the JSON


def markdown(root: Node, full_list: str) -> str:
    """The lineage as markdown: the tree (as ``medlm lineage`` prints it), then every artifact by
    kind from the artifact down to the source files, then the whole lineage as JSON.

    A node with more than ``MANY`` parents shows a few of them in the tree; a kind with more than
    ``MANY`` artifacts (1,300 downloads of a full baseline) is summarised: how many, per folder
    where the artifacts say, the first and the last. ``full_list`` (where the whole lineage is
    written as JSON) is named always; the JSON itself is in the page when the lineage has at most
    ``MANY`` * 4 artifacts."""
    levels = _by_kind(root)
    lines = [f"# Lineage of `{root.ref}`", ""]
    if root.label:
        lines += [root.label, ""]
    lines += ["```", *tree_lines(root, most=MANY, width=70), "```", ""]
    for kind, nodes in levels.items():
        lines += [f"## {kind} ({len(nodes):,})", ""]
        if len(nodes) > MANY:
            folders = _count_by(nodes, "folder")
            if folders:
                lines.append("per folder: " + ", ".join(f"{folder} {n:,}" for folder, n in folders.items()))
            first, last = nodes[0], nodes[-1]
            lines += [f"first: `{first.ref}` {first.describe()}", f"last: `{last.ref}` {last.describe()}"]
            lines += ["every one of them: in the JSON below", ""]
            continue
        for n in nodes:  # a list, not a table: a long line wraps instead of running off the page
            params = ", ".join(f"{k}={_short(v, 40)}" for k, v in n.params.items())
            lines.append(f"- `{n.ref}` {n.describe()}, created {_when(n.created)}" + (f"<br>parameters: {params}" if params else ""))
        lines.append("")
    lines += ["## The whole lineage, as JSON", "", f"Written to `{full_list}`; from a shell, `medlm lineage {root.ref} --json`.", ""]
    if sum(len(nodes) for nodes in levels.values()) <= 4 * MANY:
        lines += ["```json", json.dumps(root.as_dict(), indent=1), "```", ""]
    return "\n".join(lines)


def dot(root: Node) -> str:
    """Graphviz: ``medlm lineage REF --dot | dot -Tsvg > lineage.svg``."""
    lines = ["digraph lineage {", "  rankdir=BT;", "  node [shape=box, fontname=Helvetica, fontsize=10];"]
    for n in ancestors_first(root):
        text = f"{n.ref}\\n{n.describe()}".replace('"', "'")
        lines.append(f'  "{n.ref}" [label="{text}"];')
        lines += [f'  "{p.ref}" -> "{n.ref}";' for p in n.parents]
    return "\n".join(lines + ["}"])


def diff(a: Node, b: Node) -> list[str]:
    """What differs between two artifacts' ancestries, stage by stage: which artifacts (source files
    by their labels) are only on one side, and which parameters changed."""
    left, right = _by_kind(a), _by_kind(b)
    lines = []
    for kind in dict.fromkeys([*right, *left]):
        was, now = left.get(kind, []), right.get(kind, [])
        if {n.ref for n in was} == {n.ref for n in now}:
            continue
        if len(was) == 1 and len(now) == 1:
            changed = {k: (was[0].params.get(k), now[0].params.get(k)) for k in {*was[0].params, *now[0].params}}
            changed = {k: v for k, v in changed.items() if v[0] != v[1]}
            detail = ", ".join(f"{k}: {_short(x)} -> {_short(y)}" for k, (x, y) in sorted(changed.items()))
            lines.append(f"{kind}: {was[0].ref} -> {now[0].ref}" + (f" ({detail})" if detail else " (same parameters, other inputs)"))
            continue
        removed = sorted(n.describe() for n in was if n.ref not in {m.ref for m in now})
        added = sorted(n.describe() for n in now if n.ref not in {m.ref for m in was})
        lines.append(f"{kind}: {len(was):,} -> {len(now):,}")
        lines += [f"  - {item}" for item in removed] + [f"  + {item}" for item in added]
    return lines or ["same ancestry"]


def _by_kind(root: Node) -> dict[str, list[Node]]:
    """Nodes grouped by kind, nearest first (the artifact's own kind, then its parents' ...)."""
    depth: dict[str, int] = {}
    nodes: dict[str, Node] = {}

    def visit(node: Node, level: int) -> None:
        if depth.get(node.ref, -1) >= level:
            return
        depth[node.ref], nodes[node.ref] = level, node
        for parent in node.parents:
            visit(parent, level + 1)

    visit(root, 0)
    kinds: dict[str, list[Node]] = {}
    for node in sorted(nodes.values(), key=lambda n: (depth[n.ref], n.kind, n.label or "", n.ref)):
        kinds.setdefault(node.kind, []).append(node)
    return dict(sorted(kinds.items(), key=lambda kv: min(depth[n.ref] for n in kv[1])))


def _count_by(nodes: list[Node], param: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in nodes:
        if param in n.params:
            counts[str(n.params[param])] = counts.get(str(n.params[param]), 0) + 1
    return counts


def _short(value, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _when(created: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created)) if created else ""
