"""retrain: pretrain a model on a shards artifact (the GPU work pool runs this)."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from flows.stage import publish_lineage, run_stage
from model.train import ModelShape, OptimConfig, RunConfig, TrainConfig
from storage import Store
from tasks.pretrain import PRETRAIN, shards_tokenizer


@flow(name="retrain")
def retrain(
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
