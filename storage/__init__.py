"""The ground floor: the artifact store, stage declarations, lineage and the file contracts between stages."""

from storage.stage import Input, Stage, config_params
from storage.store import (
    Artifact,
    ArtifactError,
    ArtifactSpec,
    Store,
    default_root,
    file_digest,
    remove_tree,
    sha256_file,
    sha256_folder,
    write_text_atomic,
)

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactSpec",
    "Input",
    "Stage",
    "Store",
    "config_params",
    "default_root",
    "file_digest",
    "remove_tree",
    "sha256_file",
    "sha256_folder",
    "write_text_atomic",
]
