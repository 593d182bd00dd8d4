"""pretrain: pretrain a model on a shards artifact (the GPU work pool runs this)."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from flows.stage import publish_lineage, run_stage
from model.train import ModelShape, OptimConfig, RunConfig, TrainConfig, require_training_fits
from storage import Store
from tasks.pretrain import PRETRAIN, shards_tokenizer, shards_vocab


@flow(name="pretrain")
def pretrain(
    *,
    shape: ModelShape = ModelShape(),
    optim: OptimConfig = OptimConfig(),
    run: RunConfig = RunConfig(),
    shards_ref: Annotated[str | None, Field(description="Token shards to train on, e.g. shards/3f9a... (unset: the newest).")] = None,
) -> str:
    """Train on the shards ``shards_ref`` (default: the newest) and their tokenizer; returns the checkpoint's ref."""
    store = Store()
    shards = store.require(shards_ref) if shards_ref else store.newest("shards")
    tokenizer = store.require(shards_tokenizer(shards))
    checkpoint = run_stage(PRETRAIN, {"shards": shards, "tokenizer": tokenizer}, TrainConfig(shape, optim, run))
    get_run_logger().info("checkpoint %s: %s", checkpoint.ref, checkpoint.summary)
    publish_lineage(checkpoint.ref)
    return checkpoint.ref


def before_start(kwargs: dict, tables: dict[str, dict], config: str | None) -> None:
    """What `medlm pretrain` refuses before any flow run is made: the newest shards when the run
    configuration's tokenizer would have built others, a batch that does not divide the step, and
    a training that cannot fit in this machine's memory (estimated on the shards it would train on)."""
    store = Store()
    shards = store.require(kwargs["shards_ref"]) if kwargs.get("shards_ref") else store.newest("shards")
    vocab = shards_vocab(shards)
    wanted = tables.get("tokenizer", {}).get("vocab_size")
    if not kwargs.get("shards_ref") and wanted is not None and wanted != vocab:
        raise ValueError(f"the newest shards, {shards.ref}, have a {vocab:,}-token vocabulary and {config}'s [tokenizer] {wanted:,}: "
                         f"build its shards first (`medlm tokenize --config {config}`), or give --shards-ref shards/KEY")
    require_training_fits(TrainConfig(kwargs.get("shape", ModelShape()), kwargs.get("optim", OptimConfig()), kwargs.get("run", RunConfig())), vocab)
