"""retrain: pretrain a model on an existing shards artifact (the GPU work pool runs this)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stage import asset_key, materializing
from model.train import TrainConfig
from storage import Store
from tasks.pretrain import pretrain_task, tokenizer_ref


@flow(name="retrain")
def retrain(
    shards_ref: str,
    preset: str = "tiny",
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 3e-4,
    devices: int = 1,
    store_root: str | None = None,
) -> str:
    """Train ``preset`` for ``steps`` on the shards ``shards_ref``; returns the checkpoint's ref."""
    store = Store(store_root)
    shards = store.require(shards_ref)
    tokenizer = store.require(tokenizer_ref(shards))
    config = TrainConfig(preset=preset, max_steps=steps, batch_size=batch_size, lr=lr)
    run = materializing(pretrain_task, asset_key("checkpoint"), [asset_key("shards"), asset_key("tokenizer")])
    checkpoint = run(store, shards, tokenizer, config, devices)
    get_run_logger().info("checkpoint %s: %s", checkpoint.ref, checkpoint.summary)
    return checkpoint.ref
