"""demo: the whole pipeline, as far as it exists, on the sample data that ships in tests/data (CPU, tiny presets)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.corpus import corpus
from flows.ingest import ingest
from flows.retrain import retrain
from storage import Store

SAMPLE_MIRROR = Path(__file__).resolve().parents[1] / "tests" / "data" / "pubmed" / "mirror"


@flow(name="demo")
def demo(store_root: str | None = None, train_steps: int = 150) -> list[str]:
    corpus_ref = ingest(source=str(SAMPLE_MIRROR), store_root=store_root)
    # A vocabulary sized for ~2 MB of sample text, and 5% val/test so both are non-empty.
    shards_ref = corpus(corpus_ref, vocab_size=4096, val_fraction=0.05, test_fraction=0.05, store_root=store_root)
    checkpoint_ref = retrain(shards_ref, preset="tiny", steps=train_steps, batch_size=8, lr=1e-3, store_root=store_root)
    return [checkpoint_ref]


def built_table(store: Store, refs: list[str]) -> str:
    """A short table of every artifact behind ``refs``, parents first, with its counts."""
    nodes: dict[str, dict] = {}

    def walk(node: dict) -> None:
        if node["ref"] not in nodes:
            for parent in node["parents"]:
                walk(parent)
            nodes[node["ref"]] = node

    for ref in refs:
        walk(store.lineage(ref))
    width = max(map(len, nodes))
    return "\n".join(
        f"{ref:<{width}}  " + ", ".join(f"{k}={_number(k, v)}" for k, v in node["summary"].items() if isinstance(v, (int, float)))
        for ref, node in nodes.items()
    )


def _number(name: str, value: int | float) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if name.endswith("seq") else f"{value:,}"
