"""The training stages, each declared once: pretraining (model/train.py), fine-tuning
(model/finetune.py) and preference tuning (model/dpo.py).

A declaration says which module torchrun runs (``python -m MODULE``), the stage's config (one
table per section), the folders it reads besides its run folder (each an option, ``--shards``),
and how it trains in this process. From it come the argument list a launch gives the module and
the module's command line that reads it back (``TrainingStage.arguments`` / ``parse``, one the
inverse of the other), the module's ``main``, and what a launch may run at all
(``TRAINING_MODULES``: model/distributed.py refuses any other module, a join's included).
A fourth training stage is one more declaration here, in ``TRAINING_STAGES``, and its module
ends with ``training_stage("model.NAME").main()``.

The config travels as a JSON file in the run folder (``--config``), one object per section; on
the command line an option overrides a field of it: the first section's bare (``--preset``),
the others' named by their section (``--optim.max-steps``), as medlm's commands name them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from model.dpo import DPORun, dpo_on
from model.finetune import FinetuneRun, finetune_on
from model.train import TrainConfig, train
from storage.config import ArgumentParser, add_config_options, config_fields, config_values, make_config

CONFIG_FILE = "launch_config.json"  # in the run folder: the config a launch's processes read


@dataclass(frozen=True)
class Folder:
    """A folder a training stage reads: its option ``--NAME`` (``_`` as ``-``) and its key in the folders."""

    name: str
    help: str
    many: bool = False  # a list of folders
    optional: bool = False  # with many: the list may be empty

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class TrainingStage:
    """A training stage as torchrun's processes and this process both run it."""

    module: str  # python -m MODULE
    config: type  # a config dataclass of sections, each a config dataclass (its RunConfig named ``run``)
    folders: tuple[Folder, ...]
    train: Callable[..., dict]  # in this process: train(config, run folder, **folders) -> the run's summary

    def arguments(self, config, out: Path, folders: dict[str, Any]) -> tuple[str, ...]:
        """The module's arguments for ``config`` on ``folders`` into the run folder ``out`` (the
        config written to ``out/CONFIG_FILE``); ``parse`` reads them back."""
        if type(config) is not self.config:
            raise TypeError(f"{self.module} trains with a {self.config.__name__}, not a {type(config).__name__}")
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))
        given = []
        for folder in self.folders:
            paths = folders[folder.name] if folder.many else [folders[folder.name]]
            if paths or not folder.optional:
                given += [folder.option, *map(str, paths)]
        return ("--config", str(out / CONFIG_FILE), *given, "--out", str(out))

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        parser = ArgumentParser(prog=prog, description=importlib.import_module(self.module).__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        for folder in self.folders:
            nargs = ("*" if folder.optional else "+") if folder.many else None
            parser.add_argument(folder.option, dest=folder.name, type=Path, nargs=nargs, required=not folder.optional, default=[], help=folder.help)
        parser.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and logs (resumed if it has some)")
        sections = config_fields(self.config)
        tables = ", ".join(f'"{name}": {{...}}' for name in sections)
        parser.add_argument("--config", type=Path, help=f"JSON file: {{{tables}}}; options given here override it")
        for i, (name, info) in enumerate(sections.items()):
            add_config_options(parser, name, info.annotation, qualified=() if i == 0 else config_fields(info.annotation))
        return parser

    def parse(self, argv: list[str] | None = None, prog: str | None = None) -> tuple[Any, dict[str, Any], Path]:
        """(config, folders, run folder) of the module's command line: ``arguments``' inverse."""
        args = self.parser(prog).parse_args(argv)
        tables = json.loads(args.config.read_text()) if args.config else {}
        sections = config_fields(self.config)
        if unknown := sorted(set(tables) - set(sections)):
            raise SystemExit(f"error: {args.config}: unknown section(s) {unknown}; {self.module} reads {sorted(sections)}")
        config = self.config(**{name: make_config(info.annotation, tables.get(name, {}) | config_values(args, name), where=name) for name, info in sections.items()})
        return config, {folder.name: getattr(args, folder.name) for folder in self.folders}, args.out

    def main(self, argv: list[str] | None = None, prog: str | None = None) -> dict:
        """The module's command line: train, print the run's summary (rank 0) and return it."""
        config, folders, out = self.parse(argv, prog)
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines, to the console (or the launching stage)
        try:
            summary = self.train(config, out, **folders)
        except ValueError as e:  # bad input (no train split, a context longer than the model's): one line
            raise SystemExit(f"error: {e}") from None
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary), flush=True)
        return summary


BASE = Folder("base", "checkpoint folder (a pretrain or finetune artifact, or a ckpt_NNNNNNN folder with the tokenizer files) or a Hugging Face causal-LM folder")
DATA = Folder("data", "qa or trainset artifact folders, or records.parquet files (their train split is trained on)", many=True)

PRETRAINING = TrainingStage("model.train", TrainConfig, (Folder("shards", "shards artifact folder (meta.json + .bin files)"),),
                            lambda config, out, shards: train(config, shards, out))
FINETUNING = TrainingStage("model.finetune", FinetuneRun, (BASE, DATA), finetune_on)
PREFERENCE_TUNING = TrainingStage("model.dpo", DPORun, (
    Folder("base", "the fine-tuned model: a finetune artifact's folder (ours or a Hugging Face folder)"), DATA,
    Folder("held_out", "qa artifact folders whose validation and test questions never become pairs (nor do those of --data)", many=True, optional=True),
), dpo_on)
TRAINING_STAGES = (PRETRAINING, FINETUNING, PREFERENCE_TUNING)
TRAINING_MODULES = tuple(stage.module for stage in TRAINING_STAGES)  # what a launch may run: a join runs nothing else


def training_stage(module: str) -> TrainingStage:
    """The training stage torchrun runs as ``python -m MODULE``."""
    found = {stage.module: stage for stage in TRAINING_STAGES}
    if module not in found:
        raise ValueError(f"a launch runs one of {TRAINING_MODULES}, not {module!r}")
    return found[module]
