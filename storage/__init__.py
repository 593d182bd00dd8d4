"""The artifact store: the single source of truth for caching and lineage."""

from storage.store import (
    Artifact,
    ArtifactError,
    ArtifactSpec,
    Store,
    default_root,
    parent_refs,
    sha256_file,
    write_text_atomic,
)

__all__ = ["Artifact", "ArtifactError", "ArtifactSpec", "Store", "default_root", "parent_refs", "sha256_file", "write_text_atomic"]
