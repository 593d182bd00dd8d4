"""The store's remote: object storage that several machines share, so a GPU machine trains on
shards an ingestion machine built without a shared file system.

    MEDLM_REMOTE=s3://bucket/prefix    any S3-compatible server (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
                                       AWS_SECRET_ACCESS_KEY, AWS_REGION; AWS_ALLOW_HTTP=true for http)
    MEDLM_REMOTE=file:///shared/path   a folder every machine mounts

Through obstore (the Rust object_store crate): its conditional put (``mode="create"``, HTTP
If-None-Match: *) raises the same AlreadyExistsError on every server measured here (SeaweedFS,
moto, a local folder), where s3fs raised a different error per server; pyarrow and DuckDB, which
read fsspec URLs, never read the remote: a stage reads its inputs from the local store.

Layout:

    blobs/sha256/HEX                      every published file, by its content: uploading one twice
                                          writes the same bytes, and an artifact that links its
                                          parent's file (the corpus's parts) costs nothing more
    artifacts/KIND/KEY/manifest.json      written last, and only if absent: the remote's rename
                                          into place. No manifest, no artifact: nothing half
                                          uploaded is ever visible, and of two machines that built
                                          the same key, one manifest wins
    quarantine/KIND/KEY.TIME.json         a manifest whose files failed their sha256, with why

It is the worker's setting, like MEDLM_STORE, never a run parameter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from storage.settings import remote_url, settings, variable

REMOTE_SETTING = variable("remote")
CONNECT_SETTING = variable("connect_timeout")
_CHUNK = 8 << 20


class RemoteUnreachable(RuntimeError):
    """The remote did not answer, or refused, within the retry time; the message names it and its settings."""


def _reported(method):
    """A Remote method whose failures to reach the remote (after obstore's retries with back-off,
    for at most MEDLM_CONNECT_TIMEOUT seconds) are one RemoteUnreachable line naming the remote and
    its settings; "not there" and "there already" are answers, not failures, and pass through."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        from obstore.exceptions import AlreadyExistsError, BaseError, NotFoundError

        try:
            return method(self, *args, **kwargs)
        except (NotFoundError, AlreadyExistsError):
            raise
        except BaseError as error:
            endpoint = f" at {os.environ['AWS_ENDPOINT_URL']}" if os.environ.get("AWS_ENDPOINT_URL") else ""
            first = str(error).strip().splitlines()[0][:300]
            raise RemoteUnreachable(
                f"the remote {self.url}{endpoint} failed ({first}); retried for up to {settings().connect_timeout:.0f} s. Check {REMOTE_SETTING}, "
                f"AWS_ENDPOINT_URL and the AWS_* credentials where this runs (or raise {CONNECT_SETTING}); nothing was published half-way"
            ) from None

    return call


class RemoteCorrupt(Exception):
    """A remote artifact's bytes do not match its manifest, or one of them is gone; the message
    says which file."""

    def __init__(self, message: str, sha256: str | None):
        super().__init__(message)
        self.sha256 = sha256  # the blob that holds other bytes than its name says; None: missing


class Remote:
    """One remote (``url``); manifests and blobs, read and written with obstore."""

    def __init__(self, url: str):
        from obstore.store import from_url

        try:
            remote_url(url)
        except ValueError as error:
            raise ValueError(f"{REMOTE_SETTING}={url}: {error}") from None
        if url.startswith("file://"):
            Path(url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        self.url = url
        backoff = {"init_backoff": timedelta(seconds=1), "max_backoff": timedelta(seconds=15), "base": 2}
        self._store = from_url(url, retry_config={"max_retries": 1000, "retry_timeout": timedelta(seconds=settings().connect_timeout), "backoff": backoff})
        self._manifests: dict[str, dict] = {}  # a manifest never changes once written: read each once

    @classmethod
    def from_env(cls) -> "Remote | None":
        url = settings().remote
        return cls(url) if url else None

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    # -- reading -------------------------------------------------------------------------------

    @_reported
    def manifest(self, ref: str) -> dict | None:
        """The manifest of ``ref`` (KIND/KEY) on the remote, or None."""
        import obstore

        if ref not in self._manifests:
            try:
                self._manifests[ref] = json.loads(bytes(obstore.get(self._store, _manifest_path(ref)).bytes()))
            except FileNotFoundError:
                return None
        return self._manifests[ref]

    @_reported
    def refs(self, kind: str | None = None) -> dict[str, float]:
        """ref -> when its manifest was written, of every artifact on the remote (of ``kind``)."""
        import obstore

        found = {}
        for batch in obstore.list(self._store, f"artifacts/{kind}/" if kind else "artifacts/"):
            for meta in batch:
                parts = meta["path"].split("/")
                if len(parts) == 4 and parts[3] == "manifest.json":
                    found[f"{parts[1]}/{parts[2]}"] = meta["last_modified"].timestamp()
        return found

    @_reported
    def download(self, ref: str, folder: Path) -> dict:
        """Every file of ``ref`` into ``folder``, each hashed as it arrives; its manifest. A file
        whose sha256 differs from the manifest raises RemoteCorrupt (nothing is kept of it)."""
        import obstore

        manifest = self.manifest(ref)
        for name, entry in manifest["files"].items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            try:
                with open(target, "wb") as out:
                    for chunk in obstore.get(self._store, _blob_path(entry["sha256"])):
                        out.write(chunk)
                        digest.update(chunk)
            except FileNotFoundError:  # deleted from the remote (by hand, or a gc that raced an upload)
                target.unlink()
                raise RemoteCorrupt(f"{self.url}/{_blob_path(entry['sha256'])} ({ref}: {name}): the blob is missing", None) from None
            if digest.hexdigest() != entry["sha256"]:
                target.unlink()
                raise RemoteCorrupt(f"{self.url}/{_blob_path(entry['sha256'])} ({ref}: {name}): sha256 differs from the manifest", entry["sha256"])
        return manifest

    @_reported
    def problems(self, ref: str) -> list[str]:
        """What is wrong with ``ref`` on the remote, every blob re-hashed; empty: it verifies."""
        import obstore

        manifest = self.manifest(ref)
        if manifest is None:
            return [f"{self.url}/{_manifest_path(ref)}: missing"]
        problems = []
        for name, entry in manifest["files"].items():
            digest = hashlib.sha256()
            try:
                for chunk in obstore.get(self._store, _blob_path(entry["sha256"])):
                    digest.update(chunk)
            except FileNotFoundError:
                problems.append(f"{name}: its blob is missing")
                continue
            if digest.hexdigest() != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
        return problems

    # -- writing -------------------------------------------------------------------------------

    @_reported
    def upload(self, ref: str, folder: Path, manifest_text: str) -> bool:
        """Publish the local artifact in ``folder``: its files' blobs first, then its manifest, only
        if none is there. True when this manifest is the one published; False when another machine's
        was there first."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        manifest = json.loads(manifest_text)
        self._put_blobs(folder, manifest)
        try:
            obstore.put(self._store, _manifest_path(ref), manifest_text.encode(), mode="create")
        except AlreadyExistsError:
            return False
        self._manifests[ref] = manifest
        # A blob that was there already (another artifact's) may have been collected by a gc that
        # listed the manifests before ours was written: check, once it is, and upload it again.
        self._put_blobs(folder, manifest)
        return True

    def _put_blobs(self, folder: Path, manifest: dict) -> None:
        """Upload each of the manifest's files the remote lacks, from ``folder``."""
        import obstore

        for name, entry in manifest["files"].items():
            blob = _blob_path(entry["sha256"])
            if not self._has(blob, entry["size"]):
                with open(folder / name, "rb") as f:
                    obstore.put(self._store, blob, f, chunk_size=_CHUNK)

    @_reported
    def quarantine(self, ref: str, reasons: list[str], bad_blobs: tuple[str, ...] = ()) -> str:
        """Move ``ref``'s manifest aside with why, and each blob in ``bad_blobs`` (bytes that are
        not what its name says: an upload would take it for the right file) to quarantine/blobs/;
        where the manifest went. Nothing is deleted."""
        import obstore

        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for sha256 in bad_blobs:
            obstore.copy(self._store, _blob_path(sha256), f"quarantine/blobs/{sha256}.{stamp}")
            obstore.delete(self._store, _blob_path(sha256))
        text = json.dumps({"ref": ref, "reasons": reasons, "quarantined": time.time(), "manifest": self.manifest(ref)}, indent=1)
        target = f"quarantine/{ref}.{stamp}.json"
        obstore.put(self._store, target, text.encode())
        obstore.delete(self._store, _manifest_path(ref))
        self._manifests.pop(ref, None)
        return f"{self.url}/{target}"

    @_reported
    def quarantined(self) -> list[dict]:
        import obstore

        notes = [json.loads(bytes(obstore.get(self._store, m["path"]).bytes()))
                 for batch in obstore.list(self._store, "quarantine/") for m in batch if not m["path"].startswith("quarantine/blobs/")]
        return sorted(notes, key=lambda note: note["quarantined"])

    @_reported
    def pin(self, ref: str) -> None:
        import obstore

        obstore.put(self._store, f"pins/{ref}", b"")

    @_reported
    def unpin(self, ref: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, f"pins/{ref}")
        except FileNotFoundError:
            pass

    @_reported
    def pins(self) -> set[str]:
        import obstore

        return {m["path"].removeprefix("pins/") for batch in obstore.list(self._store, "pins/") for m in batch}

    @_reported
    def remove(self, ref: str) -> None:
        """Unpublish ``ref`` (its manifest); ``collect_blobs`` deletes what no manifest names."""
        import obstore

        obstore.delete(self._store, _manifest_path(ref))
        self._manifests.pop(ref, None)

    @_reported
    def collect_blobs(self, min_age_s: float) -> int:
        """Delete the blobs that no published or quarantined manifest names and that are older
        than ``min_age_s`` (a blob of an upload under way is named by no manifest yet: its manifest
        comes last); how many bytes."""
        import obstore

        named = {entry["sha256"] for ref in self.refs() for entry in self.manifest(ref)["files"].values()}
        named |= {entry["sha256"] for note in self.quarantined() for entry in (note.get("manifest") or {}).get("files", {}).values()}
        freed, now = 0, time.time()
        for meta in self._blobs():
            if meta["path"].rsplit("/", 1)[1] not in named and now - meta["last_modified"].timestamp() >= min_age_s:
                obstore.delete(self._store, meta["path"])
                freed += meta["size"]
        return freed

    def _blobs(self) -> Iterator[dict]:
        import obstore

        for batch in obstore.list(self._store, "blobs/sha256/"):
            yield from batch

    def _has(self, path: str, size: int) -> bool:
        import obstore

        try:
            return obstore.head(self._store, path)["size"] == size
        except FileNotFoundError:
            return False


def _manifest_path(ref: str) -> str:
    return f"artifacts/{ref}/manifest.json"


def _blob_path(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"
