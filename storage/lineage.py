"""Lineage: an artifact and its ancestors, read from the manifests' parent refs.

One walker serves the ``medlm lineage`` tree, the demo's table and the lineage artifacts a run
publishes in the Prefect UI. The store knows nothing about any stage: what a node shows is its
manifest's ``label`` (set by the stage, e.g. a source file's name and md5) and its counts.
"""

from __future__ import annotations

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
    parents: list["Node"] = field(default_factory=list)
    missing: bool = False

    @property
    def kind(self) -> str:
        return self.ref.split("/", 1)[0]

    def describe(self) -> str:
        """The label if the stage gave one, else the artifact's counts."""
        return self.label or summary_line(self.summary)

    def as_dict(self) -> dict:
        return {
            "ref": self.ref, "label": self.label, "params": self.params, "summary": self.summary,
            "created": self.created, "missing": self.missing, "parents": [p.as_dict() for p in self.parents],
        }


def lineage(store: Store, ref: str) -> Node:
    """``ref`` and its ancestors. Each artifact is read once: a shared ancestor (the corpus under
    both the shards and the tokenizer) is the same node wherever it appears."""
    nodes: dict[str, Node] = {}

    def node(ref: str) -> Node:
        if ref not in nodes:
            artifact = store.get(ref)
            if artifact is None:
                nodes[ref] = Node(ref, missing=True)
            else:
                m = artifact.manifest
                parents = [node(p) for p in artifact.parents]
                nodes[ref] = Node(ref, artifact.label, artifact.params, artifact.summary, m.get("created"), parents)
        return nodes[ref]

    return node(ref)


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


def tree_lines(root: Node) -> list[str]:
    """An indented tree (``medlm lineage``); a subtree already shown is named, not repeated."""
    lines: list[str] = []
    seen: set[str] = set()

    def walk(node: Node, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        name = node.ref + (" (missing from the store)" if node.missing else "")
        detail = node.describe()
        repeated = node.ref in seen and node.parents
        lines.append(prefix + branch + name + (f"  {detail}" if detail else "") + ("  (see above)" if repeated else ""))
        if repeated:
            return
        seen.add(node.ref)
        child_prefix = prefix + ("" if top else ("    " if last else "│   "))
        parents = _display_order(node.parents)
        for i, parent in enumerate(parents):
            walk(parent, child_prefix, i == len(parents) - 1, False)

    walk(root, "", True, True)
    return lines


def table(*roots: Node) -> str:
    """One line per artifact behind ``roots``, parents first, with its counts (the demo's table)."""
    nodes = list(ancestors_first(*roots))
    width = max(len(n.ref) for n in nodes)
    return "\n".join(f"{n.ref:<{width}}  {summary_line(n.summary, numbers_only=True)}" for n in nodes)


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
