"""A stage, declared once: what it is called, what it reads, how it is configured and what it builds.

    CORPUS = Stage(
        name="corpus",                       # module, artifact kind, Prefect asset and task
        version="2",                         # bump when the same inputs and config would build different bytes
        config=CorpusConfig,                 # a dataclass: CLI options, flow parameters and the UI form
        inputs={"parsed": Input("parse", many=True)},
        build=build_corpus,                  # pure: build(inputs, out_dir, config) -> summary
    )
    corpus = CORPUS.run(store, {"parsed": parsed}, CorpusConfig())

Everything else is derived from the declaration: the artifact key (the stage's version, the
config fields that decide content, and the input refs), the store's ``get_or_build`` call, and
in ``flows/stage.py`` the Prefect task with its asset and asset dependencies. No Prefect here,
so a stage runs from a plain Python shell, under ``torchrun`` or in a worker process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

from storage.store import Artifact, ArtifactError, ArtifactSpec, Store

ConfigT = TypeVar("ConfigT")
Inputs = Mapping[str, "Artifact | list[Artifact]"]


@dataclass(frozen=True)
class Input:
    """One role a stage reads: the artifact kind(s) it accepts, whether it takes a list, and
    whether it may be left out (given as None)."""

    kinds: str | tuple[str, ...]
    many: bool = False
    optional: bool = False

    def accepts(self, kind: str) -> bool:
        return kind in ((self.kinds,) if isinstance(self.kinds, str) else self.kinds)


def config_params(config: Any) -> dict:
    """The config fields that decide an artifact's content: all but the class's ``RUNTIME_FIELDS``
    (threads, memory limits, retry timings: how the work is done, not what it makes); a config
    made of configs (fine-tuning's) leaves out each one's own."""
    runtime = getattr(config, "RUNTIME_FIELDS", ())
    params = asdict(config)
    for f in fields(config):
        if is_dataclass(value := getattr(config, f.name)):
            params[f.name] = config_params(value)
    return {k: v for k, v in params.items() if k not in runtime}


@dataclass(frozen=True, eq=False)  # one object per stage: compared and hashed by identity
class Stage(Generic[ConfigT]):
    name: str
    version: str
    config: type[ConfigT]
    inputs: Mapping[str, Input]
    build: Callable[[Inputs, Path, ConfigT], dict | None]
    resume: bool = False  # keep the work folder of a killed build and hand it back (downloads, training)
    # What paths in the config point at, as key params (e.g. a source file's sha256), so the key
    # follows the bytes, not where they are; the paths themselves are RUNTIME_FIELDS.
    content: Callable[[ConfigT], dict] | None = None
    # A short human label for lineage listings, e.g. a source file's name and md5.
    label: Callable[[Inputs, ConfigT], str] | None = None
    # Rows for a table a person reads (the run page in the UI): what the artifact holds.
    report: Callable[[Artifact], list[dict]] | None = None
    # Which failures are worth running the stage again for, minutes later (a network outage); the
    # rest (bad XML, a bad config) fail at once.
    retry_if: Callable[[BaseException], bool] | None = None

    def spec(self, inputs: Inputs, config: ConfigT) -> ArtifactSpec:
        """The artifact's identity; its key is a pure function of this."""
        self._check(inputs, config)
        params = config_params(config) | (self.content(config) if self.content else {})
        return ArtifactSpec(self.name, self.version, params, tuple(self._refs(inputs)))

    def run(self, store: Store, inputs: Inputs, config: ConfigT) -> Artifact:
        """The artifact for these inputs and config: from the store, or built now."""
        spec = self.spec(inputs, config)
        return store.get_or_build(
            spec,
            lambda work: self.build(inputs, work, config),
            resume=self.resume,
            label=self.label(inputs, config) if self.label else None,
        )

    def _refs(self, inputs: Inputs) -> list[str]:
        refs = []
        for role in self.inputs:
            value = inputs.get(role)
            # A list input is a set: the same artifacts in any order make the same key.
            refs += sorted(a.ref for a in value) if isinstance(value, list) else [value.ref] if value is not None else []
        return refs

    def _check(self, inputs: Inputs, config: ConfigT) -> None:
        if not isinstance(config, self.config):
            raise TypeError(f"stage {self.name} takes a {self.config.__name__}, got {type(config).__name__}")
        required = {role for role, spec in self.inputs.items() if not spec.optional}
        if not required <= set(inputs) <= set(self.inputs):
            raise ArtifactError(f"stage {self.name} reads {sorted(self.inputs)} ({sorted(required)} required), was given {sorted(inputs)}")
        for role, spec in self.inputs.items():
            value = inputs.get(role)
            if value is None and spec.optional:
                continue
            artifacts = value if isinstance(value, list) else [value]
            if isinstance(value, list) != spec.many or (spec.many and not value):
                expected = "a non-empty list of artifacts" if spec.many else "one artifact"
                raise ArtifactError(f"stage {self.name}: input {role!r} must be {expected}")
            for artifact in artifacts:
                if not spec.accepts(artifact.kind):
                    raise ArtifactError(
                        f"stage {self.name}: input {role!r} must be a {spec.kinds} artifact, got {artifact.ref}"
                    )
