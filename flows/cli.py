"""The `medlm` command. Imports stay inside the commands so `medlm --help` needs neither prefect nor torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.settings import apply_prefect_defaults

app = typer.Typer(help="medlm: train a medical language model from PubMed, as a Prefect pipeline.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect the artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")

StoreOption = typer.Option(None, "--store", envvar="MEDLM_STORE", help="Artifact store root [default: ./.medlm/store].")


def _store(root: Optional[Path]):
    from storage import Store

    return Store(root)


@store_app.command("ls")
def store_ls(kind: Optional[str] = typer.Argument(None, help="Only this kind (download, parsed, corpus, ...)."), store: Optional[Path] = StoreOption):
    """List the complete artifacts in the store."""
    artifacts = _store(store).ls(kind)
    if not artifacts:
        typer.echo(f"no artifacts in {_store(store).root}")
        return
    from storage import summary_line

    for a in artifacts:
        typer.echo(f"{a.ref:<40} {summary_line(a.summary)}")


@store_app.command("verify")
def store_verify(ref: str, store: Optional[Path] = StoreOption):
    """Re-hash every file of an artifact against its manifest."""
    problems = _store(store).problems(ref)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{ref}: ok")


@app.command()
def lineage(ref: str, store: Optional[Path] = StoreOption, as_json: bool = typer.Option(False, "--json", help="Nested JSON instead of a tree.")):
    """Show where an artifact came from, down to the source XML files and their md5s."""
    s = _store(store)
    s.require(ref)
    if as_json:
        typer.echo(json.dumps(s.lineage(ref), indent=2))
    else:
        typer.echo("\n".join(s.lineage_lines(ref)))


@app.command()
def ingest(
    source: str = typer.Option("https://ftp.ncbi.nlm.nih.gov/pubmed", help="NCBI's PubMed URL, or a local mirror folder with the same layout."),
    folder: list[str] = typer.Option(["baseline", "updatefiles"], help="Remote folders to read (repeat)."),
    baseline_limit: Optional[int] = typer.Option(None, help="Only the first N baseline files."),
    updates_after: Optional[int] = typer.Option(None, help="Only update files after this sequence number."),
    name: list[str] = typer.Option([], help="Only these file names (repeat)."),
    store: Optional[Path] = StoreOption,
):
    """Download, parse and snapshot PubMed into the store."""
    apply_prefect_defaults()
    from flows.ingest import ingest as ingest_flow

    ref = ingest_flow(
        source=source,
        folders=tuple(folder),
        baseline_limit=baseline_limit,
        updates_after=updates_after,
        names=name or None,
        store_root=str(store) if store else None,
    )
    typer.echo(ref)


@app.command()
def tokenize(
    corpus: Optional[str] = typer.Option(None, help="Corpus snapshot ref [default: the newest]."),
    tokenizer: Optional[str] = typer.Option(None, help="Re-use this tokenizer ref instead of fitting one."),
    vocab_size: int = typer.Option(32_000, help="BPE vocabulary size, specials included."),
    max_documents: Optional[int] = typer.Option(None, help="Fit the tokenizer on a deterministic sample of this many documents."),
    shard_tokens: int = typer.Option(2**28, help="Tokens per train shard."),
    store: Optional[Path] = StoreOption,
):
    """Fit the tokenizer on a corpus snapshot and write the uint16 token shards (the `corpus` flow)."""
    apply_prefect_defaults()
    from flows.corpus import corpus as corpus_flow

    typer.echo(
        corpus_flow(
            corpus_ref=corpus, tokenizer_ref=tokenizer, vocab_size=vocab_size, max_documents=max_documents,
            shard_tokens=shard_tokens, store_root=str(store) if store else None,
        )
    )


@app.command()
def retrain(
    shards: Optional[str] = typer.Option(None, help="Shards ref [default: the newest]."),
    preset: str = typer.Option("tiny", help="Model preset: tiny, small, base, gpt2."),
    steps: int = typer.Option(200),
    batch_size: int = typer.Option(8, help="Micro-batch per process."),
    tokens_per_step: Optional[int] = typer.Option(None, help="Global batch in tokens (gradient accumulation)."),
    lr: float = typer.Option(3e-4),
    devices: int = typer.Option(1, help="GPUs; more than one launches torchrun."),
    store: Optional[Path] = StoreOption,
):
    """Pretrain on token shards as a Prefect flow, registering the checkpoint in the store (the `retrain` flow)."""
    apply_prefect_defaults()
    from flows.retrain import retrain as retrain_flow

    typer.echo(
        retrain_flow(
            shards_ref=shards, preset=preset, steps=steps, batch_size=batch_size, tokens_per_step=tokens_per_step,
            lr=lr, devices=devices, store_root=str(store) if store else None,
        )
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def train(ctx: typer.Context):
    """Pretrain without Prefect: takes the flags of `python -m model.train` (try `medlm train --help`)."""
    from model.train import main

    main(ctx.args, prog="medlm train")


@app.command("export-hf")
def export_hf(
    checkpoint: Path = typer.Argument(..., help="A ckpt_NNNNNNN folder or a checkpoint artifact folder."),
    out: Path = typer.Argument(..., help="Folder to write the Hugging Face model into."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer folder to copy in (a checkpoint artifact already has one)."),
):
    """Export a checkpoint so transformers' AutoModelForCausalLM / AutoTokenizer load it."""
    from model.export_hf import TOKENIZER_FILES, export_hf as export

    if tokenizer is None and all((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = checkpoint
    typer.echo(export(checkpoint, out, tokenizer))


@app.command()
def demo(store: Optional[Path] = StoreOption):
    """Run the whole pipeline on the sample data that ships with the repository (CPU, tiny presets)."""
    apply_prefect_defaults()
    from flows.demo import built_table, demo as demo_flow

    refs = demo_flow(store_root=str(store) if store else None)
    s = _store(store)
    typer.echo(f"\nDemo outputs are in {s.root.resolve()}:\n")
    typer.echo(built_table(s, refs))
    typer.echo(f"\nTrace any of them with: medlm lineage {refs[-1]}")
