"""Bits per byte and perplexity, by lm-eval's ``loglikelihood_rolling`` convention (see
model/scoring.py): every document scored alone, conditioned on the model's prefix token; bits
per byte = total negative log-likelihood in bits / total UTF-8 bytes of the text, which compares
models with different tokenizers; token perplexity = exp(NLL / tokens) does not.

The documents: a shards folder's test split, or abstracts newer than the model's corpus.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from model.data import Shards
from model.scoring import CausalLM
from tasks.evaluate.kinds import Kind
from tasks.evaluate.statistics import ratio


def shard_documents(shards_dir: str | Path, split: str = "test") -> list[list[int]]:
    """The token ids of each document of a shards folder's ``split`` (cut at [EOS], which is dropped)."""
    shards = Shards.open(shards_dir, splits=(split,))
    stream = np.concatenate([shards.tokens(name) for name in shards.files(split)])
    ends = np.flatnonzero(stream == shards.special_tokens["eos_id"])
    starts = np.concatenate(([0], ends + 1))
    return [stream[a:b].tolist() for a, b in zip(starts, np.append(ends, len(stream))) if b > a]


def shards_perplexity(lm: CausalLM, shards_dir: str | Path, split: str = "test", max_documents: int | None = None, stride: int | None = None, name: str | None = None) -> dict:
    """Bits per byte and perplexity on a shards folder's ``{split}.bin``, made with lm's tokenizer.

    Each document (the first max_documents, if given) is scored alone, as lm-eval scores one; its
    bytes are those of its decoded text.
    """
    all_documents = shard_documents(shards_dir, split)
    documents = all_documents[:max_documents]
    result = _language_modelling(lm, documents, [lm.decode(d) for d in documents], stride)
    return {"name": name or f"{Path(shards_dir).name}/{split}.bin", "documents_in_file": len(all_documents)} | result


def text_bits_per_byte(lm: CausalLM, texts: Sequence[str], name: str = "held-out text", stride: int | None = None) -> dict:
    """Bits per byte on raw texts, each encoded by lm's own tokenizer: fair across tokenizers."""
    return {"name": name} | _language_modelling(lm, [lm.encode(t) for t in texts], list(texts), stride)


def _language_modelling(lm: CausalLM, documents: list[list[int]], texts: list[str], stride: int | None) -> dict:
    if not documents:
        raise ValueError("no documents to score")
    logprobs = lm.rolling_loglikelihoods(documents, stride)
    per_item = [
        {"id": str(i), "nll": -lp, "tokens": len(d), "bytes": len(t.encode("utf-8"))}
        for i, (lp, d, t) in enumerate(zip(logprobs, documents, texts))
    ]
    result = {
        "kind": LANGUAGE_MODELLING.name,
        "window": lm.max_length,
        "stride": stride or lm.max_length,
        "method": (
            f"lm-eval loglikelihood_rolling: each document alone after prefix token {lm.prefix_token_id}, "
            f"windows of {lm.max_length} tokens, stride {stride or lm.max_length}"
        ),
        "baseline_rule": {"rule": "none"},
        "per_item": per_item,
    }
    return result | LANGUAGE_MODELLING.summarise(result)


def newer_abstracts(newer_dir: Path, corpus_dir: Path, limit: int | None) -> list[str]:
    """Documents of a snapshot newer than the model's corpus whose PMIDs that corpus never had: the
    articles published since it was trained (a temporal hold-out, what a nightly-retrained model
    meets next), first by PMID."""
    from storage.formats import corpus_tables, iter_corpus

    seen = {pmid for table in corpus_tables(corpus_dir, ["pmid"]) for pmid in table.column("pmid").to_pylist()}
    texts: list[str] = []
    for pmids, batch in iter_corpus(newer_dir):
        texts += [t for p, t in zip(pmids, batch) if p not in seen]
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    return texts


class LanguageModelling(Kind):
    name = "language_modelling"
    main_metric = "bits_per_byte"
    corpus = "ncbi/pubmed"  # the shards' test split and the new abstracts are PubMed text

    def summary(self, items: list[dict], rule: dict) -> dict:
        nll, tokens, nbytes = ([i[k] for i in items] for k in ("nll", "tokens", "bytes"))
        metrics = {
            "bits_per_byte": ratio(nll, nbytes, lambda r: r / math.log(2)),
            "byte_perplexity": ratio(nll, nbytes, math.exp),
            "token_perplexity": ratio(nll, tokens, math.exp),
        }
        return {"metrics": metrics, "baseline": None, "tokens": int(sum(tokens)), "bytes": int(sum(nbytes))}

    def setting(self, result: dict) -> str:
        return f"rolling windows of {result['window']} tokens, stride {result['stride']}"


LANGUAGE_MODELLING = LanguageModelling()
