"""What the pretraining corpus already held of the evaluated items, and the score without them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tasks.evaluate.generation import normalize_answer
from tasks.evaluate.results import score_subset

NGRAM = 13  # GPT-3's decontamination length: long enough that a match is copied text, not shared phrasing


def ngrams(text: str, n: int = NGRAM) -> set[str]:
    """The text's word n-grams after the evaluation's normalisation (lower case, no punctuation, no
    articles): what the contamination check, and the hygiene stage's screen, compare."""
    words = normalize_answer(text).split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def contamination(records: Sequence[dict], corpus_dir: Path) -> dict[str, str]:
    """id -> how an item overlaps the pretraining corpus, for the items that do: an item about a
    PubMed article (PubMedQA's: its dataset's ``pmid``) by that PMID (its context is that abstract),
    the others by a 13-gram of the question found in the corpus text (lower-cased, punctuation and
    articles dropped)."""
    from storage.formats import iter_corpus, read_corpus
    from tasks.qa.registry import item_pmid

    pmids = {pmid: r["id"] for r in records if (pmid := item_pmid(r)) is not None}
    by_gram: dict[str, list[str]] = {}
    for r in records:
        if item_pmid(r) is None:
            for gram in ngrams(r["question"]):
                by_gram.setdefault(gram, []).append(r["id"])
    found: dict[str, str] = {}
    in_corpus = read_corpus(corpus_dir, ["pmid"]).column("pmid").to_pylist()
    found |= {pmids[p]: "PMID in the corpus" for p in set(in_corpus) & set(pmids)}
    if by_gram:
        for _, texts in iter_corpus(corpus_dir):
            for text in texts:
                for gram in ngrams(text) & by_gram.keys():
                    found |= {item: f"{NGRAM}-gram of the question in the corpus" for item in by_gram[gram]}
    return found


def clean_score(result: dict, overlaps: dict[str, str]) -> dict:
    """How many scored items the pretraining corpus held (``overlaps``: contamination's answer),
    and the score without them."""
    ids = [i["id"] for i in result["per_item"]]
    seen = [i for i in ids if i in overlaps]
    clean = [i for i in ids if i not in overlaps]
    report = {"overlapping_items": len(seen), "why": sorted({overlaps[i] for i in seen})}
    if clean:
        subset = score_subset(result, clean)
        report["clean"] = {"n": len(clean), "metrics": subset["metrics"]}
    return report
