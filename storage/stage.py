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

import json
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

from storage.lineage import lineage
from storage.store import Artifact, ArtifactError, ArtifactSpec, Store

ConfigT = TypeVar("ConfigT")
Inputs = Mapping[str, "Artifact | list[Artifact]"]


@dataclass(frozen=True)
class Input:
    """One role a stage reads: the artifact kind(s) it accepts, whether it takes a list, whether
    it may be left out (given as None), and whether it decides the content.

    ``keyed=False`` marks an input that only makes the build faster, such as the previous corpus
    snapshot an incremental build starts from: the result must be the same bytes without it, so
    it is neither in the key nor among the parents. Its files are verified before use all the same.
    """

    kinds: str | tuple[str, ...]
    many: bool = False
    optional: bool = False
    keyed: bool = True

    def accepts(self, kind: str) -> bool:
        return kind in ((self.kinds,) if isinstance(self.kinds, str) else self.kinds)


def config_params(config: Any) -> dict:
    """The config fields that decide an artifact's content: all but the class's ``RUNTIME_FIELDS``
    (threads, memory limits, retry timings: how the work is done, not what it makes); a config
    made of configs (fine-tuning's) leaves out each one's own. What its ``content_params()``
    derives, if it has one, is added: a setting that names a file is runtime (the path says
    nothing), and the file's content goes into the key instead."""
    runtime = getattr(config, "RUNTIME_FIELDS", ())
    params = asdict(config)
    for f in fields(config):
        if is_dataclass(value := getattr(config, f.name)):
            params[f.name] = config_params(value)
    derived = getattr(config, "content_params", None)
    return {k: v for k, v in params.items() if k not in runtime} | (derived() if derived else {})


@dataclass(frozen=True, eq=False)  # one object per stage: compared and hashed by identity
class Stage(Generic[ConfigT]):
    name: str
    version: str
    config: type[ConfigT]
    inputs: Mapping[str, Input]
    build: Callable[..., dict | None]  # build(inputs, out_dir, config[, lineage]) -> summary
    resume: bool = False  # keep the work folder of a killed build and hand it back (downloads, training)
    # A short human label for lineage listings, e.g. a source file's name and md5.
    label: Callable[[Inputs, ConfigT], str] | None = None
    # Rows for a table a person reads (the run page in the UI): what the artifact holds.
    report: Callable[[Artifact], list[dict]] | None = None
    # Which failures are worth running the stage again for, minutes later (a network outage); the
    # rest (bad XML, a bad config) fail at once.
    retry_if: Callable[[BaseException], bool] | None = None
    # The build also reads where its inputs came from (a release's lineage.json and model card):
    # it is called build(inputs, out_dir, config, lineage), ``lineage`` mapping each role of one
    # artifact to its storage/lineage.py Node, read from the manifests (no file is fetched).
    lineage: bool = False

    def spec(self, inputs: Inputs, config: ConfigT) -> ArtifactSpec:
        """The artifact's identity; its key is a pure function of this."""
        self._check(inputs, config)
        return ArtifactSpec(self.name, self.version, config_params(config), tuple(self._refs(inputs)))

    def run(self, store: Store, inputs: Inputs, config: ConfigT, *, build_in: Executor | None = None) -> Artifact:
        """The artifact for these inputs and config: from the store, or built now.

        The build reads its inputs from ``store``, whichever process or machine the Artifact
        objects were made on (a Dask worker may mount the shared store elsewhere).

        ``build_in``: an executor to run the pure build function in, such as worker processes
        (lxml holds the GIL: in threads, files would parse one at a time). The store's part (key,
        lock, input checks, manifest, hashes) stays here; the function goes by reference, its
        inputs pickled, with absolute paths.
        """
        spec = self.spec(inputs, config)
        label = self.label(inputs, config) if self.label else None

        extra = ({role: lineage(store, a.ref) for role, a in inputs.items() if isinstance(a, Artifact)},) if self.lineage else ()

        def build(work: Path) -> dict | None:
            if build_in is None:
                return self.build(_in_store(store, inputs), work, config, *extra)
            try:
                return build_in.submit(self.build, _in_store(store, inputs), work.absolute(), config, *extra).result()
            except BrokenExecutor as e:
                raise ArtifactError(
                    f"{self.name} {label or spec.ref}: the worker process building it ended abruptly ({e}); "
                    f"was it killed or out of memory? Run again"
                ) from e

        unkeyed = [a.ref for role, input_ in self.inputs.items() if not input_.keyed for a in _artifacts(inputs.get(role))]
        return store.get_or_build(spec, build, resume=self.resume, label=label, also_reads=unkeyed, roles=self._roles(inputs))

    def previous(self, store: Store, inputs: Inputs, config: ConfigT) -> Artifact | None:
        """The newest stored artifact of this stage, version and content config whose parents are
        all among ``inputs``' (but not all of them): what an incremental build can start from,
        with the fewest inputs left to apply. None when there is none."""
        spec = self.spec(inputs, config)
        wanted = set(spec.parents)
        fits = [
            a for a in store.ls(self.name)
            if a.key != spec.key and a.manifest.get("version") == spec.version and a.params == _json_round_trip(spec.params)
            and set(a.parents) <= wanted
        ]
        return max(fits, key=lambda a: (len(a.parents), a.manifest.get("created", 0)), default=None)

    def _roles(self, inputs: Inputs) -> dict[str, list[str]]:
        """The parents' refs by role, in the declaration's order; a list input is a set: the same
        artifacts in any order make the same key."""
        return {role: sorted(a.ref for a in _artifacts(inputs.get(role))) for role, spec in self.inputs.items() if spec.keyed and inputs.get(role)}

    def _refs(self, inputs: Inputs) -> list[str]:
        return [ref for refs in self._roles(inputs).values() for ref in refs]

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


def _artifacts(value: "Artifact | list[Artifact] | None") -> list[Artifact]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _in_store(store: Store, inputs: Inputs) -> dict:
    """``inputs`` with every artifact's path under ``store``'s root."""

    def local(artifact: Artifact) -> Artifact:
        return replace(artifact, path=store.path(artifact.kind, artifact.key).absolute())

    return {role: [local(a) for a in value] if isinstance(value, list) else value and local(value) for role, value in inputs.items()}


def _json_round_trip(params: dict) -> dict:
    """``params`` as a manifest stores them (tuples become lists), to compare with one read back."""
    return json.loads(json.dumps(params, default=str))
