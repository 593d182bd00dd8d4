"""The artifact store: the single source of truth for caching and lineage."""

from storage.store import (
    Artifact,
    ArtifactError,
    ArtifactSpec,
    Store,
    default_root,
    file_digest,
    sha256_file,
    summary_line,
    write_text_atomic,
)

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactSpec",
    "Store",
    "default_root",
    "file_digest",
    "sha256_file",
    "summary_line",
    "write_text_atomic",
]
