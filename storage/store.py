"""The artifact store: content-keyed folders, written atomically, with manifests and lineage.

An artifact lives at ``ROOT/KIND/KEY``. KEY is a hash of everything that decides its content
(the parents' refs, the stage's parameters and a stage version string). It is built in
``ROOT/KIND/KEY.partial`` under an exclusive file lock, its ``manifest.json`` is written last,
and the folder is made read-only and renamed into place. No manifest, no artifact: a half-built
folder is never read, and a stale one left by a killed run is removed (or resumed, for stages
that ask to).

Nothing is ever deleted by a check. An artifact that fails one (a file missing, a size or a
sha256 that differs from its manifest) is moved to ``ROOT/.quarantine/KIND/KEY.<time>`` with a
note of why, and rebuilt; only ``medlm store purge`` deletes quarantined folders. Before a
stage reads its inputs, their files are checked against the manifest hashes, each file at most
once per state (size, mtime, inode; remembered under ``ROOT/.verified``).

With a remote (``MEDLM_REMOTE``, storage/remote.py) the local store is a cache of it: what is
built is uploaded (its manifest last), what a stage reads and the local store lacks is
downloaded and every file's sha256 checked before it is published locally, a build whose key is
on the remote is not built again, and lineage reads manifests from either. A machine holds only
what its stages read or built.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat as stat_module
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from storage.access import readable, readable_files
from storage.remote import Remote, RemoteCorrupt
from storage.settings import settings

MANIFEST = "manifest.json"
KEY_LENGTH = 20  # hex chars of sha256: 80 bits, no collisions at any corpus size we will see
QUARANTINE = ".quarantine"
VERIFIED = ".verified"
PINS = ".pins"
LOCKS = ".locks"
LEASES = ".leases"  # LEASES/RUN: what a flow run has made or read, kept from retention while it runs
PUSHED = ".pushed"  # PUSHED/<remote's digest>/KIND/KEY: on that remote already (no request to ask)
_REMOTES: dict[str, Remote] = {}
_HELD: dict[Path, object] = {}  # this process's leases (Store.hold): their locked files, open
_HOLDING = threading.Lock()  # a flow's stages run in threads
_WRITE_BITS = stat_module.S_IWUSR | stat_module.S_IWGRP | stat_module.S_IWOTH

log = logging.getLogger("medlm.store")


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or its build failed."""


def default_root() -> Path:
    return settings().store


def file_digest(path: Path, algorithm: str = "sha256"):
    """The hashlib object of ``path``'s bytes (still open to more data, for resumed downloads)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm)


def sha256_file(path: Path) -> str:
    return file_digest(path).hexdigest()


def sha256_folder(folder: Path) -> str:
    """One digest of an outside folder's content (a Hugging Face model): every file's path in it
    and its sha256, so a moved copy is the same input and a changed file is not. Every file must
    be readable data (``storage.access``: a link may not lead out of the data roots)."""
    folder = readable(folder, "model folder")
    listing = "".join(f"{f.relative_to(folder)}:{sha256_file(f)}\n" for f in readable_files(folder, "model folder"))
    return hashlib.sha256(listing.encode()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # one per writer
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _make_read_only(folder: Path) -> None:
    """Take the write bits off every file and folder under ``folder`` (and itself)."""
    for path in [*folder.rglob("*"), folder]:
        path.chmod(path.stat().st_mode & ~_WRITE_BITS)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that also removes read-only files and folders (published artifacts are read-only)."""

    def make_writable_and_retry(function, failed_path, _exc_info) -> None:
        # A file's own mode never stops its removal, and it may be a hard link that another
        # artifact shares: only folders are made writable.
        failed = Path(failed_path)
        for writable in (failed.parent, *([failed] if failed.is_dir() and not failed.is_symlink() else [])):
            writable.chmod(writable.stat().st_mode | stat_module.S_IWUSR)
        function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)  # onexc needs Python 3.12


def _file_state(path: Path, sha256: str, stat: os.stat_result | None = None) -> list:
    """What identifies one state of a file's bytes, with the digest they were found to have."""
    stat = stat or path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256]


class _VerifiedFiles:
    """One artifact's files known to match their manifest: name -> [size, mtime_ns, inode, sha256]."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save(self, files: dict) -> None:
        if files != self.load():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(files, sort_keys=True))


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
    def present(self) -> bool:
        """Whether its files are in this machine's store (``Store.ls`` also lists the remote's)."""
        return (self.path / MANIFEST).is_file()

    @property
    def parents(self) -> list[str]:
        return list(self.manifest.get("parents", []))

    @property
    def label(self) -> str | None:
        return self.manifest.get("label")

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
    def __init__(self, root: str | os.PathLike | None = None, remote: str | None = None):
        """``remote``: a URL (default: MEDLM_REMOTE, the process's setting; unset: no remote)."""
        self.root = Path(root) if root is not None else default_root()
        url = remote if remote is not None else settings().remote
        self.remote = (_REMOTES.get(url) or _REMOTES.setdefault(url, Remote(url))) if url else None

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- reading ---------------------------------------------------------------------------

    def path(self, kind: str, key: str) -> Path:
        if not kind.isidentifier() or not key.isalnum():
            raise ArtifactError(f"invalid artifact ref {kind}/{key}: expected KIND/HEXKEY")
        return self.root / kind / key

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` lies inside the store (where nothing but the store may write)."""
        return Path(path).resolve().is_relative_to(self.root.resolve())

    def get(self, ref_or_kind: str, key: str | None = None) -> Artifact | None:
        """The artifact if it is complete and its manifest verifies (files present, sizes right), else None."""
        kind, key = _split(ref_or_kind, key)
        manifest, problems = self._check(kind, key, hash_files=False)
        return None if problems else Artifact(kind, key, self.path(kind, key), manifest)

    def manifest(self, ref: str) -> dict | None:
        """The manifest of ``ref``, local or on the remote (no file is fetched): for lineage."""
        if artifact := self.get(ref):
            return artifact.manifest
        return self.remote.manifest(_join(*_split(ref))) if self.remote else None

    def resolve(self, ref: str) -> str:
        """The full ref of the stored artifact a user names: KIND/KEY or KIND/ a unique prefix of
        the key (``store ls`` and the README print them short), here or on the remote.
        ArtifactError when none or several match."""
        kind, prefix = _split(ref)
        self.path(kind, prefix)  # a plain kind and key, or an error
        folder = self.root / kind
        keys = sorted(p.name for p in folder.glob(f"{prefix}*") if p.name.isalnum() and p.is_dir()) if folder.is_dir() else []
        if self.remote and prefix not in keys:
            keys = sorted({*keys, *(r.split("/")[1] for r in self.remote.refs(kind) if r.split("/")[1].startswith(prefix))})
        if prefix in keys or len(keys) == 1:
            return f"{kind}/{prefix if prefix in keys else keys[0]}"
        if not keys:
            raise ArtifactError(f"artifact {ref} is not in the store at {self.root}; list what is there with `medlm store ls`")
        raise ArtifactError(f"{ref} is ambiguous in the store at {self.root}: {', '.join(f'{kind}/{k}' for k in keys)}; give more of the key")

    def require(self, ref: str) -> Artifact:
        """The artifact named by a user (a unique prefix of its key will do), fetched from the
        remote if only it has it; one that is here but fails its check is quarantined."""
        kind, key = _split(self.resolve(ref))
        manifest, problems = self._check(kind, key, hash_files=False)
        if not problems:
            return Artifact(kind, key, self.path(kind, key), manifest)
        if self.path(kind, key).exists():
            moved = self.quarantine(kind, key, problems)
            if not (self.remote and self.remote.manifest(_join(kind, key))):
                raise ArtifactError(f"{kind}/{key} failed its check ({problems[0]}) and was moved to {moved}; run the stage that builds it again")
        if pulled := self._pull(kind, key):
            return pulled
        raise ArtifactError(f"{kind}/{key} failed its check on the remote {self.remote.url if self.remote else ''} and was quarantined there; run the stage that builds it again")

    def problems(self, ref: str) -> list[str]:
        """What is wrong with ``ref``, every file re-hashed (``medlm store verify``); empty: it is good."""
        kind, key = _split(ref)
        return self._check(kind, key, hash_files=True, trust_cache=False)[1]

    def verified(self, ref: str) -> Artifact:
        """The artifact after every file's sha256 matched its manifest, for a stage about to read it.

        A file is hashed at most once per state: its (size, mtime, inode) and the digest it had
        are remembered under ``ROOT/.verified``, and a file whose state is unchanged is trusted.
        One that fails is quarantined, and ArtifactError names the file.
        """
        kind, key = _split(ref)
        if not self.path(kind, key).exists() and self.remote and self.remote.manifest(_join(kind, key)):
            self._pull(kind, key)  # what this machine has not got yet: fetched, every sha256 checked
        manifest, problems = self._check(kind, key, hash_files=True)
        if problems:
            if self.path(kind, key).exists():
                moved = self.quarantine(kind, key, problems)
                raise ArtifactError(
                    f"input {ref} is corrupt: {'; '.join(problems[:3])}. It was moved to {moved}; "
                    f"run again to rebuild it (or rebuild it with the command that made it)"
                )
            raise ArtifactError(f"input {ref} is not in the store at {self.root} ({problems[0]})")
        return Artifact(kind, key, self.path(kind, key), manifest)

    def _check(self, kind: str, key: str, *, hash_files: bool, trust_cache: bool = True) -> tuple[dict, list[str]]:
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
        cache = self._verified_cache(kind, key) if hash_files else None
        known = cache.load() if cache is not None and trust_cache else {}
        problems, proven = [], {}
        for name, entry in manifest.get("files", {}).items():
            file = path / name
            try:
                stat = file.stat()
            except FileNotFoundError:
                problems.append(f"{file}: missing")
                continue
            if stat.st_size != entry["size"]:
                problems.append(f"{file}: size {stat.st_size}, manifest says {entry['size']}")
            elif hash_files:
                state = _file_state(file, entry["sha256"], stat)
                if known.get(name) != state:
                    if sha256_file(file) != entry["sha256"]:
                        problems.append(f"{file}: sha256 differs from the manifest")
                        continue
                proven[name] = state
        if cache is not None and not problems:
            cache.save(proven)
        return manifest, problems

    def _trusted(self, ref: str) -> list[str]:
        """The files of ``ref`` that ``verified`` will trust without hashing: their (size, mtime,
        inode) are as when they were last hashed."""
        kind, key = _split(ref)
        known = self._verified_cache(kind, key).load()
        return [name for name, state in known.items() if (self.path(kind, key) / name).exists()
                and _file_state(self.path(kind, key) / name, state[3]) == state]

    def _verified_cache(self, kind: str, key: str) -> "_VerifiedFiles":
        return _VerifiedFiles(self.root / VERIFIED / kind / f"{key}.json")

    def ls(self, kind: str | None = None, *, local: bool = False) -> list[Artifact]:
        """Complete artifacts (of ``kind``), oldest first: here, and unless ``local`` on the
        remote too (those are not fetched: ``present`` is False until a stage reads them)."""
        kinds = [kind] if kind else sorted(p.name for p in self.root.glob("*") if p.is_dir() and not p.name.startswith("."))
        found = []
        for k in kinds:
            for path in sorted((self.root / k).glob("*")):
                if path.is_dir() and "." not in path.name and (artifact := self.get(k, path.name)):
                    found.append(artifact)
        if self.remote and not local:
            here = {a.ref for a in found}
            for ref in self.remote.refs(kind):
                if ref not in here and (manifest := self.remote.manifest(ref)) is not None:
                    found.append(Artifact(*_split(ref), self.path(*_split(ref)), manifest))
        return sorted(found, key=lambda a: (a.kind, a.manifest.get("created", 0)))

    def newest(self, kind: str) -> Artifact:
        """The most recently built complete artifact of ``kind`` (fetched, if only the remote has it)."""
        artifacts = self.ls(kind)
        if not artifacts:
            where = f" or on {self.remote.url}" if self.remote else ""
            raise ArtifactError(f"no {kind} artifact in the store at {self.root}{where}; build one first (see `medlm --help`)")
        return self.require(artifacts[-1].ref)

    # -- quarantine ------------------------------------------------------------------------

    def quarantine(self, kind: str, key: str, reasons: list[str]) -> Path:
        """Move an artifact that failed a check to ``ROOT/.quarantine/KIND/KEY.<time>`` (never delete it)."""
        source = self.path(kind, key)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
        target = self.root / QUARANTINE / kind / f"{key}.{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            target.with_name(target.name + ".json"),
            json.dumps({"ref": f"{kind}/{key}", "reasons": reasons, "quarantined": time.time()}, indent=2) + "\n",
        )
        source.chmod(source.stat().st_mode | stat_module.S_IWUSR)  # moving a folder rewrites its ".." entry
        os.rename(source, target)
        log.warning("quarantined %s/%s (%s) at %s; it will be rebuilt when next needed", kind, key, "; ".join(reasons[:3]), target)
        return target

    def quarantined(self) -> list[dict]:
        """What was moved aside: [{"ref", "path", "reasons", "quarantined"}], oldest first."""
        items = []
        for note in sorted((self.root / QUARANTINE).glob("*/*.json")):
            folder = note.with_suffix("")
            if folder.exists():
                items.append({**json.loads(note.read_text()), "path": str(folder)})
        return sorted(items, key=lambda item: item["quarantined"])

    def purge_quarantine(self) -> list[dict]:
        """Delete everything in quarantine (only ever on the user's request); returns what was removed."""
        items = self.quarantined()
        for item in items:
            remove_tree(Path(item["path"]))
            Path(item["path"] + ".json").unlink()
        return items

    # -- writing ---------------------------------------------------------------------------

    def work_dir(self, spec: ArtifactSpec) -> Path:
        """Where ``spec`` is being built; kept across a crash only for resumable builds."""
        return self.root / spec.kind / f"{spec.key}.partial"

    @contextmanager
    def _lock(self, kind: str, key: str, reads: Sequence[str] = ()) -> Iterator[None]:
        """The key's build lock; while it is held, the lock file lists the artifacts the build
        reads (``reading_now``: what retention must not remove)."""
        lock_dir = self.root / kind / LOCKS
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{key}.lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Another process (or thread) is building the same artifact; wait for it.
                fcntl.flock(f, fcntl.LOCK_EX)
            f.truncate(0)
            f.write(json.dumps(list(reads)))
            f.flush()
            yield

    def reading_now(self) -> set[str]:
        """The artifacts that builds running now (in any process) read: their locks are held."""
        reads: set[str] = set()
        for lock in self.root.glob(f"*/{LOCKS}/*.lock"):
            with open(lock, "a+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    try:
                        reads.update(json.loads(f.read() or "[]"))
                    except json.JSONDecodeError:  # caught between its truncate and its write: look again
                        return self.reading_now()
        return reads

    # -- leases: what running flows still need -----------------------------------------------

    def hold(self, run: str, refs: Sequence[str]) -> None:
        """Keep ``refs`` from retention while the flow run ``run`` lasts: they join its lease,
        ROOT/.leases/RUN, a file this process keeps locked (shared, so that every process of the
        run may hold it) until it calls ``release_holds`` or ends, however it ends."""
        lease = self.root / LEASES / run
        with _HOLDING:
            self._write_lease(lease, refs)

    @staticmethod
    def _write_lease(lease: Path, refs: Sequence[str]) -> None:
        held = _HELD.get(lease)
        if held is None:
            lease.parent.mkdir(parents=True, exist_ok=True)
            while True:  # a lease gc deleted as stale while we opened it: open the new one
                held = open(lease, "a")
                fcntl.flock(held, fcntl.LOCK_SH)
                if lease.exists() and os.stat(lease).st_ino == os.fstat(held.fileno()).st_ino:
                    break
                held.close()
            _HELD[lease] = held
        held.write("".join(f"{ref}\n" for ref in refs))  # appends: several processes may write
        held.flush()


    def held(self) -> dict[str, str]:
        """The artifacts running flows have made or read: ref -> the flow run holding it. A lease no
        process holds any more (its flow ended, or its process was killed) is deleted."""
        refs: dict[str, str] = {}
        for lease in sorted((self.root / LEASES).glob("*")):
            if not self._drop_unheld(lease):
                refs.update(dict.fromkeys(lease.read_text().split(), lease.name))
        return refs

    @staticmethod
    def _drop_unheld(lease: Path) -> bool:
        """Delete ``lease`` if no process holds it; whether it was deleted."""
        try:
            with open(lease, "a") as probe:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lease.unlink()
                return True
        except BlockingIOError:
            return False
        except FileNotFoundError:
            return True

    # -- pins and removal ----------------------------------------------------------------------

    def pin(self, ref: str) -> str:
        """Keep ``ref`` (and so its ancestors) whatever retention decides, here and on the
        remote; its full ref."""
        ref = self.resolve(ref)
        path = self.root / PINS / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        if self.remote:
            self.remote.pin(ref)
        return ref

    def unpin(self, ref: str) -> str:
        ref = self.resolve(ref)
        (self.root / PINS / ref).unlink(missing_ok=True)
        if self.remote:
            self.remote.unpin(ref)
        return ref

    def pinned(self) -> set[str]:
        here = {f"{p.parent.name}/{p.name}" for p in self.root.glob(f"{PINS}/*/*")}
        return here | (self.remote.pins() if self.remote else set())

    def remove(self, ref: str) -> None:
        """Delete a complete artifact (retention's, on the user's request): it disappears in one
        rename, then its files are deleted; a file hard-linked from another artifact stays there."""
        kind, key = _split(ref)
        trash = self.root / ".trash" / f"{kind}-{key}.{os.getpid()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(kind, key):
            source = self.path(kind, key)
            source.chmod(source.stat().st_mode | stat_module.S_IWUSR)  # moving a folder rewrites its ".." entry
            os.rename(source, trash)
        remove_tree(trash)
        self._verified_cache(kind, key).path.unlink(missing_ok=True)
        (self.root / PINS / kind / key).unlink(missing_ok=True)

    def get_or_build(
        self,
        spec: ArtifactSpec,
        build: Callable[[Path], dict | None],
        *,
        resume: bool = False,
        label: str | None = None,
        also_reads: Sequence[str] = (),
        roles: Mapping[str, Sequence[str]] | None = None,
    ) -> Artifact:
        """Return the artifact for ``spec``, building it with ``build(work_dir)`` if needed.

        ``build`` writes its files into ``work_dir`` and may return a summary dict (row and
        token counts, ...) that goes into the manifest. Before it runs, every parent's files are
        verified against their manifest hashes (see ``verified``). With ``resume`` a work folder
        left by a killed run is handed back to ``build`` as it is (downloads keep their ``.part``,
        training its checkpoints); otherwise it is removed first. ``label`` names the artifact
        for people in lineage listings. ``also_reads``: artifacts the build reads that are not
        parents (they only make it faster), verified the same way. ``roles``: the parents by the
        role the build read them in (a stage's input names), kept in the manifest for lineage's
        readers (a release's card tells data trained on from data held out). The published artifact's files
        and folders are read-only; a file that is a hard link to a verified input's file is not
        hashed again.
        """
        if artifact := self.get(spec.kind, spec.key):
            return replace(self._push(artifact), reused=True)
        with self._lock(spec.kind, spec.key, reads=[*spec.parents, *also_reads]):
            manifest, problems = self._check(spec.kind, spec.key, hash_files=False)
            if not problems:  # built while we waited
                return replace(self._push(Artifact(spec.kind, spec.key, self.path(spec.kind, spec.key), manifest)), reused=True)
            final = self.path(spec.kind, spec.key)
            if final.exists():  # present but failed its check: moved aside, then rebuilt
                self.quarantine(spec.kind, spec.key, problems)
            if self.remote and self.remote.manifest(spec.ref) and (pulled := self._pull(spec.kind, spec.key, locked=True)):
                return replace(pulled, reused=True)  # built on another machine
            inputs = (*spec.parents, *also_reads)
            trusted = {ref: self._trusted(ref) for ref in inputs}
            for ref in inputs:
                self.verified(ref)
            work = self.work_dir(spec)
            if work.exists() and not resume:
                remove_tree(work)
            work.mkdir(parents=True, exist_ok=True)
            started = time.time()
            try:
                with _rehashed(self, trusted, work):
                    summary = build(work) or {}
            except BaseException:
                if work.exists() and (not resume or not any(work.iterdir())):  # nothing to resume from: leave no half-built folder behind
                    remove_tree(work)
                raise
            for stale in [work / MANIFEST, *work.glob(f".{MANIFEST}*.tmp")]:  # from a build killed while writing them
                stale.unlink(missing_ok=True)
            files = sorted(p for p in work.rglob("*") if p.is_file())
            # (size, mtime, inode) -> sha256 of the verified inputs' files, for the files the build linked from them.
            known = {} if all(p.stat().st_nlink == 1 for p in files) else {
                tuple(state[:3]): state[3] for ref in (*spec.parents, *also_reads) for state in self._verified_cache(*_split(ref)).load().values()
            }
            manifest = {
                "kind": spec.kind,
                "key": spec.key,
                "version": spec.version,
                "params": spec.params,
                "parents": list(spec.parents),
                **({"roles": {role: list(refs) for role, refs in roles.items()}} if roles else {}),
                "label": label,
                "summary": summary,
                "created": time.time(),
                "build_seconds": round(time.time() - started, 3),
                "files": {str(p.relative_to(work)): {"size": p.stat().st_size, "sha256": _digest(p, known)} for p in files},
            }
            text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            write_text_atomic(work / MANIFEST, text)
            _make_read_only(work)
            os.rename(work, final)
            # The bytes were hashed just now: remember them, so the first reader hashes nothing.
            self._verified_cache(spec.kind, spec.key).save(
                {name: _file_state(final / name, entry["sha256"]) for name, entry in manifest["files"].items()}
            )
            # The manifest as any later read gives it, none of its objects shared with the inputs':
            # Prefect links a task's inputs to upstream tasks by object identity, and an interned
            # role name ("download") would link a parse artifact to the download task's result.
            return self._push(Artifact(spec.kind, spec.key, final, json.loads(text)), locked=True)

    # -- the remote ------------------------------------------------------------------------------

    def _pushed_marker(self, kind: str, key: str) -> Path:
        return self.root / PUSHED / hashlib.sha256(self.remote.url.encode()).hexdigest()[:16] / kind / key

    def _push(self, artifact: Artifact, *, locked: bool = False) -> Artifact:
        """Upload a local artifact the remote lacks (its manifest last); the artifact as the store
        now holds it. When another machine published the key first with other bytes, theirs wins:
        ours is quarantined and theirs fetched, so every machine reads the same bytes for a key.
        ``locked``: the caller holds the key's lock (taking it again on another descriptor would
        wait for ourselves)."""
        if self.remote is None or self._pushed_marker(artifact.kind, artifact.key).exists():
            return artifact
        text = (artifact.path / MANIFEST).read_text()
        if not self.remote.upload(artifact.ref, artifact.path, text):
            theirs = self.remote.manifest(artifact.ref)
            if {n: e["sha256"] for n, e in theirs["files"].items()} != {n: e["sha256"] for n, e in artifact.manifest["files"].items()}:
                self.quarantine(artifact.kind, artifact.key, [f"{self.remote.url} has {artifact.ref} with other bytes, published first"])
                return self._pull(artifact.kind, artifact.key, locked=locked) or artifact
        self._mark_pushed(artifact.kind, artifact.key)
        return artifact

    def _mark_pushed(self, kind: str, key: str) -> None:
        marker = self._pushed_marker(kind, key)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _pull(self, kind: str, key: str, *, locked: bool = False) -> Artifact | None:
        """Fetch ``kind/key`` from the remote and publish it here, every file's sha256 checked as it
        arrives; None (and the remote's copy quarantined) when one does not match."""
        with nullcontext() if locked else self._lock(kind, key):
            if artifact := self.get(kind, key):  # fetched while we waited
                return artifact
            ref, work = _join(kind, key), self.root / kind / f"{key}.pull"
            if work.exists():
                remove_tree(work)
            work.mkdir(parents=True)
            try:
                manifest = self.remote.download(ref, work)
            except RemoteCorrupt as e:
                remove_tree(work)
                moved = self.remote.quarantine(ref, [str(e)], bad_blobs=(e.sha256,) if e.sha256 else ())
                log.warning("%s failed its check on the remote and was quarantined at %s; it will be built again", ref, moved)
                return None
            except BaseException:  # the remote unreachable, the process stopped: nothing half-fetched stays
                remove_tree(work)
                raise
            write_text_atomic(work / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _make_read_only(work)
            final = self.path(kind, key)
            os.rename(work, final)
            self._verified_cache(kind, key).save({name: _file_state(final / name, e["sha256"]) for name, e in manifest["files"].items()})
            self._mark_pushed(kind, key)
            return Artifact(kind, key, final, manifest)


@contextmanager
def _rehashed(store: Store, trusted: dict[str, list[str]], work: Path) -> Iterator[None]:
    """The inputs' files that were trusted without hashing (``trusted``: ref -> names) hashed while
    the block builds from them, in a thread, and the build refused if one differs from its
    manifest. ``verified`` trusts a file whose (size, mtime, inode) it has hashed before, but bit
    rot changes none of them: every file a stage builds from is checked against its sha256 before
    anything made from it is published, each once a build (before it, if its state is new; else
    during it). A corrupt input is quarantined, and the work folder goes too (a training's
    checkpoints learnt from it)."""
    found: dict[str, list[str]] = {}

    def rehash() -> None:
        for ref, names in trusted.items():
            manifest = store._check(*_split(ref), hash_files=False)[0]
            for name in names:
                file = store.path(*_split(ref)) / name
                if sha256_file(file) != manifest["files"][name]["sha256"]:
                    found.setdefault(ref, []).append(f"{file}: sha256 differs from the manifest")

    thread = threading.Thread(target=rehash, name="medlm-rehash", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if found:
        remove_tree(work)
        moved = [store.quarantine(*_split(ref), problems) for ref, problems in found.items()]
        problems = [p for ps in found.values() for p in ps]
        raise ArtifactError(f"input {', '.join(found)} is corrupt: {'; '.join(problems[:3])}; nothing was published. It was moved to "
                            f"{', '.join(map(str, moved))}: run again to rebuild it (or rebuild it with the command that made it)")


def release_holds() -> None:
    """This process's flows have ended: it holds no lease any more (``Store.hold``)."""
    with _HOLDING:
        leases = list(_HELD.items())
        _HELD.clear()
    for lease, held in leases:
        held.close()
        Store._drop_unheld(lease)


def _digest(path: Path, known: dict[tuple, str]) -> str:
    stat = path.stat()
    return known.get((stat.st_size, stat.st_mtime_ns, stat.st_ino)) or sha256_file(path)


def _join(kind: str, key: str) -> str:
    return f"{kind}/{key}"


def _split(ref_or_kind: str, key: str | None = None) -> tuple[str, str]:
    if key is not None:
        return ref_or_kind, key
    kind, sep, key = ref_or_kind.strip("/").partition("/")
    if not sep or not key:
        raise ArtifactError(f"invalid artifact ref {ref_or_kind!r}: expected KIND/KEY, e.g. corpus/3f9a...")
    return kind, key
