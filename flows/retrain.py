"""retrain: pretrain a model on an existing shards artifact (the GPU work pool runs this)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stage import asset_key, materializing
from model.train import TrainConfig
from storage import Store
from tasks.pretrain import pretrain_task, tokenizer_ref


@flow(name="retrain")
def retrain(
    shards_ref: str | None = None,
    preset: str = "tiny",
    steps: int = 200,
    batch_size: int = 8,
    tokens_per_step: int | None = None,
    lr: float = 3e-4,
    devices: int = 1,
    store_root: str | None = None,
) -> str:
    """Train ``preset`` for ``steps`` on the shards ``shards_ref`` (default: the newest); returns the checkpoint's ref."""
    store = Store(store_root)
    shards = store.require(shards_ref) if shards_ref else store.newest("shards")
    tokenizer = store.require(tokenizer_ref(shards))
    config = TrainConfig(preset=preset, max_steps=steps, batch_size=batch_size, tokens_per_step=tokens_per_step, lr=lr)
    run = materializing(pretrain_task, asset_key("checkpoint"), [asset_key("shards"), asset_key("tokenizer")])
    checkpoint = run.submit(store, shards, tokenizer, config, devices).result()
    get_run_logger().info("checkpoint %s: %s", checkpoint.ref, checkpoint.summary)
    return checkpoint.ref
