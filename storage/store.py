"""The artifact store: content-keyed folders, written atomically, with manifests and lineage.

An artifact lives at ``ROOT/KIND/KEY``. KEY is a hash of everything that decides its content
(the parents' refs, the stage's parameters and a stage version string). It is built in
``ROOT/KIND/KEY.partial`` under an exclusive file lock, its ``manifest.json`` is written last,
and the folder is renamed into place. No manifest, no artifact: a half-built folder is never
read, and a stale one left by a killed run is removed (or resumed, for stages that ask to).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

MANIFEST = "manifest.json"
DEFAULT_ROOT = Path(".medlm") / "store"
KEY_LENGTH = 20  # hex chars of sha256: 80 bits, no collisions at any corpus size we will see


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or its build failed."""


def default_root() -> Path:
    return Path(os.environ.get("MEDLM_STORE", DEFAULT_ROOT))


def file_digest(path: Path, algorithm: str = "sha256"):
    """The hashlib object of ``path``'s bytes (still open to more data, for resumed downloads)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm)


def sha256_file(path: Path) -> str:
    return file_digest(path).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Artifact:
    """A complete artifact on disk. ``ref`` ("kind/key") names it everywhere."""

    kind: str
    key: str
    path: Path
    manifest: dict = field(repr=False, compare=False, hash=False)
    # True when get_or_build found it already built: the flows report such a stage as Cached.
    reused: bool = field(default=False, repr=False, compare=False, hash=False)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.key}"

    @property
    def parents(self) -> list[str]:
        return list(self.manifest.get("parents", []))

    @property
    def params(self) -> dict:
        return dict(self.manifest.get("params", {}))

    @property
    def summary(self) -> dict:
        return dict(self.manifest.get("summary", {}))

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class ArtifactSpec:
    """What decides an artifact's content; its key is a pure function of this."""

    kind: str
    version: str
    params: dict = field(default_factory=dict)
    parents: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        blob = json.dumps(
            {"kind": self.kind, "version": self.version, "params": self.params, "parents": list(self.parents)},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.key}"


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- reading ---------------------------------------------------------------------------

    def path(self, kind: str, key: str) -> Path:
        if not kind.isidentifier() or not key.isalnum():
            raise ArtifactError(f"invalid artifact ref {kind}/{key}: expected KIND/HEXKEY")
        return self.root / kind / key

    def get(self, ref_or_kind: str, key: str | None = None, *, deep: bool = False) -> Artifact | None:
        """The artifact if it is complete and its manifest verifies, else None.

        The default check is the manifest plus every listed file's presence and size; ``deep``
        also re-hashes every file (what ``medlm store verify`` does).
        """
        kind, key = _split(ref_or_kind, key)
        manifest, problems = self._check(kind, key, deep=deep)
        return None if problems else Artifact(kind, key, self.path(kind, key), manifest)

    def require(self, ref: str) -> Artifact:
        artifact = self.get(ref)
        if artifact is None:
            raise ArtifactError(
                f"artifact {ref} is not in the store at {self.root} (or failed verification); "
                f"list what is there with `medlm store ls`"
            )
        return artifact

    def problems(self, ref: str, *, deep: bool = True) -> list[str]:
        """Human-readable reasons why ``ref`` does not verify (empty list: it is good)."""
        return self._check(*_split(ref), deep=deep)[1]

    def _check(self, kind: str, key: str, *, deep: bool) -> tuple[dict, list[str]]:
        """The manifest and what is wrong with the artifact (nothing: it verifies)."""
        path = self.path(kind, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {}, [f"{path / MANIFEST}: missing"]
        except json.JSONDecodeError as e:
            return {}, [f"{path / MANIFEST}: not valid JSON ({e})"]
        if manifest.get("kind") != kind or manifest.get("key") != key:
            return manifest, [f"{path / MANIFEST}: describes {manifest.get('kind')}/{manifest.get('key')}, not {kind}/{key}"]
        return manifest, self._problems(path, manifest, deep=deep)

    @staticmethod
    def _problems(path: Path, manifest: dict, *, deep: bool) -> list[str]:
        problems = []
        for name, entry in manifest.get("files", {}).items():
            file = path / name
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                problems.append(f"{file}: missing")
                continue
            if size != entry["size"]:
                problems.append(f"{file}: size {size}, manifest says {entry['size']}")
            elif deep and sha256_file(file) != entry["sha256"]:
                problems.append(f"{file}: sha256 differs from the manifest")
        return problems

    def ls(self, kind: str | None = None) -> list[Artifact]:
        kinds = [kind] if kind else sorted(p.name for p in self.root.glob("*") if p.is_dir())
        found = []
        for k in kinds:
            for path in sorted((self.root / k).glob("*")):
                if path.is_dir() and "." not in path.name and (artifact := self.get(k, path.name)):
                    found.append(artifact)
        return sorted(found, key=lambda a: (a.kind, a.manifest.get("created", 0)))

    def newest(self, kind: str) -> Artifact:
        """The most recently built complete artifact of ``kind``."""
        artifacts = self.ls(kind)
        if not artifacts:
            raise ArtifactError(f"no {kind} artifact in the store at {self.root}; build one first (see `medlm --help`)")
        return artifacts[-1]

    # -- writing ---------------------------------------------------------------------------

    def work_dir(self, spec: ArtifactSpec) -> Path:
        """Where ``spec`` is being built; kept across a crash only for resumable builds."""
        return self.root / spec.kind / f"{spec.key}.partial"

    @contextmanager
    def _lock(self, kind: str, key: str) -> Iterator[None]:
        lock_dir = self.root / kind / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{key}.lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Another process (or thread) is building the same artifact; wait for it.
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def get_or_build(
        self,
        spec: ArtifactSpec,
        build: Callable[[Path], dict | None],
        *,
        resume: bool = False,
    ) -> Artifact:
        """Return the artifact for ``spec``, building it with ``build(work_dir)`` if needed.

        ``build`` writes its files into ``work_dir`` and may return a summary dict (row and
        token counts, ...) that goes into the manifest. With ``resume`` a work folder left by
        a killed run is handed back to ``build`` as it is (downloads keep their ``.part``,
        training its checkpoints); otherwise it is removed first.
        """
        if artifact := self.get(spec.kind, spec.key):
            return replace(artifact, reused=True)
        with self._lock(spec.kind, spec.key):
            if artifact := self.get(spec.kind, spec.key):  # built while we waited
                return replace(artifact, reused=True)
            final = self.path(spec.kind, spec.key)
            if final.exists():  # present but failed verification: rebuild it
                shutil.rmtree(final)
            work = self.work_dir(spec)
            if work.exists() and not resume:
                shutil.rmtree(work)
            work.mkdir(parents=True, exist_ok=True)
            started = time.time()
            summary = build(work) or {}
            for stale in (MANIFEST, f".{MANIFEST}.tmp"):  # from a build killed while writing them
                (work / stale).unlink(missing_ok=True)
            manifest = {
                "kind": spec.kind,
                "key": spec.key,
                "version": spec.version,
                "params": spec.params,
                "parents": list(spec.parents),
                "summary": summary,
                "created": time.time(),
                "build_seconds": round(time.time() - started, 3),
                "files": {
                    str(p.relative_to(work)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                    for p in sorted(work.rglob("*"))
                    if p.is_file()
                },
            }
            write_text_atomic(work / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.rename(work, final)
            return Artifact(spec.kind, spec.key, final, manifest)

    # -- lineage ---------------------------------------------------------------------------

    def lineage(self, ref: str) -> dict:
        """The artifact and its ancestors as a nested dict (a DAG unrolled into a tree).

        Each artifact is read once: a shared ancestor (the corpus under both the shards and the
        tokenizer) is the same node wherever it appears."""
        nodes: dict[str, dict] = {}

        def node(ref: str) -> dict:
            if ref not in nodes:
                artifact = self.get(ref)
                if artifact is None:
                    nodes[ref] = {"ref": ref, "missing": True, "parents": []}
                else:
                    parents = [node(p) for p in artifact.parents]
                    nodes[ref] = {"ref": ref, "params": artifact.params, "summary": artifact.summary, "parents": parents}
            return nodes[ref]

        return node(ref)

    def lineage_lines(self, ref: str) -> list[str]:
        """``medlm lineage``: an indented tree; a subtree already shown is named, not repeated."""
        lines: list[str] = []
        seen: set[str] = set()

        def walk(node: dict, prefix: str, last: bool, top: bool) -> None:
            branch = "" if top else ("└── " if last else "├── ")
            label = node["ref"] + (" (missing from the store)" if node.get("missing") else "")
            detail = _describe(node)
            repeated = node["ref"] in seen and node["parents"]
            lines.append(prefix + branch + label + (f"  {detail}" if detail else "") + ("  (see above)" if repeated else ""))
            if repeated:
                return
            seen.add(node["ref"])
            child_prefix = prefix + ("" if top else ("    " if last else "│   "))
            for i, parent in enumerate(node["parents"]):
                walk(parent, child_prefix, i == len(node["parents"]) - 1, False)

        walk(self.lineage(ref), "", True, True)
        return lines


def _describe(node: dict) -> str:
    params = node.get("params", {})
    if "file_name" in params:  # a downloaded source file: name the XML and its md5
        return f"{params['file_name']} md5={params.get('md5', '?')}"
    return summary_line(node.get("summary", {}))


def summary_line(summary: dict) -> str:
    """An artifact's counts as ``key=value`` words (lists and nested stats left out)."""
    return " ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str)))


def _split(ref_or_kind: str, key: str | None = None) -> tuple[str, str]:
    if key is not None:
        return ref_or_kind, key
    kind, sep, key = ref_or_kind.strip("/").partition("/")
    if not sep or not key:
        raise ArtifactError(f"invalid artifact ref {ref_or_kind!r}: expected KIND/KEY, e.g. corpus/3f9a...")
    return kind, key
