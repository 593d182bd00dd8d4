"""The shards stage on real PubMed text: the split, the shards, meta.json, the store."""

from __future__ import annotations

import json
import random
from collections import Counter
import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, models

from model.data import Shards
from storage import ArtifactSpec, sha256_file
from conftest import write_corpus
from storage.formats import EOS_ID, load_tokenizer, read_corpus, split_of
from tasks.shards import SHARDS, ShardsConfig, encode_corpus

# Shards small enough that train rolls over several times (the session tokenizer's split has 5%
# val and 5% test, so the ~2,000 documents give non-empty val and test files).
CONFIG = ShardsConfig(shard_tokens=60_000)
SPLIT = {"val_fraction": 0.05, "test_fraction": 0.05}


@pytest.fixture(scope="module", params=[CONFIG.shard_tokens, 400], ids=["60k-token-shards", "400-token-shards"])
def shards(request, session_store, corpus, tokenizer):
    """With 400-token shards most documents are longer than a shard and get one of their own."""
    return SHARDS.run(session_store, {"corpus": corpus, "tokenizer": tokenizer}, ShardsConfig(shard_tokens=request.param))


def test_split_is_a_stable_function_of_the_pmid():
    rng = random.Random(0)
    old = rng.sample(range(1, 40_000_000), 100_000)
    before = {pmid: split_of(pmid) for pmid in old}
    grown = old + rng.sample(range(40_000_000, 41_000_000), 100_000)
    rng.shuffle(grown)
    after = {pmid: split_of(pmid) for pmid in grown}
    assert all(after[pmid] == split for pmid, split in before.items())

    counts = Counter(after.values())  # 200k PMIDs, 1,000 expected per held-out split, sd ~32
    assert 850 < counts["val"] < 1_150 and 850 < counts["test"] < 1_150
    wide = Counter(split_of(pmid, 0.1, 0.2) for pmid in grown)
    assert abs(wide["val"] / len(grown) - 0.1) < 0.005 and abs(wide["test"] / len(grown) - 0.2) < 0.005


def test_meta_json_describes_the_files(shards, tokenizer):
    meta = json.loads(shards.file("meta.json").read_text())
    assert list(meta) == ["dtype", "vocab_size", "pad_id", "unk_id", "bos_id", "eos_id", "tokenizer", "split", "files"]
    assert (meta["dtype"], meta["vocab_size"]) == ("uint16", tokenizer.summary["vocab_size"])
    assert (meta["pad_id"], meta["unk_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2, 3)
    assert meta["tokenizer"] == {"ref": tokenizer.ref, "sha256": sha256_file(tokenizer.file("tokenizer.json"))}
    assert meta["split"] == {"val_fraction": 0.05, "test_fraction": 0.05}
    train = [name for name, f in meta["files"].items() if f["split"] == "train"]
    assert len(train) >= 3 and train == [f"train_{i:04d}.bin" for i in range(len(train))]
    assert list(meta["files"])[len(train):] == ["val.bin", "test.bin"]
    for name, entry in meta["files"].items():
        assert shards.file(name).stat().st_size == 2 * entry["tokens"]
        assert entry["tokens"] > 0 and entry["documents"] > 0
    assert shards.summary["train_shards"] == len(train)
    loaded = Shards.open(shards.path)  # the pretraining loader accepts the folder as it is
    assert loaded.files("train") == train and loaded.vocab_size == meta["vocab_size"]


def test_shards_decode_to_the_documents_in_order(shards, tokenizer, documents):
    meta = json.loads(shards.file("meta.json").read_text())
    decoder = load_tokenizer(tokenizer.file("tokenizer.json"))
    for split in ("train", "val", "test"):
        expected = [text for pmid, text in documents if split_of(pmid, 0.05, 0.05) == split]
        decoded = []
        for name, entry in meta["files"].items():
            if entry["split"] != split:
                continue
            tokens = np.fromfile(shards.file(name), dtype="<u2")
            assert tokens[-1] == EOS_ID  # whole documents only: none spans two shards
            if split == "train":
                one_document = np.count_nonzero(tokens == EOS_ID) == 1
                assert len(tokens) <= shards.params["shard_tokens"] or one_document
            ends = np.flatnonzero(tokens == EOS_ID)
            assert len(ends) == entry["documents"]
            starts = np.concatenate([[0], ends[:-1] + 1])
            decoded += decoder.decode_batch([tokens[s:e].tolist() for s, e in zip(starts, ends)])
        assert decoded == expected, split


def test_rerun_is_a_store_hit(session_store, corpus, tokenizer, shards):
    again = SHARDS.run(session_store, {"corpus": corpus, "tokenizer": tokenizer}, ShardsConfig(**shards.params))
    assert again.path == shards.path and again.manifest["created"] == shards.manifest["created"]
    assert shards.parents == [corpus.ref, tokenizer.ref]


def test_a_build_that_fails_midway_leaves_no_artifact(session_store, corpus, tokenizer):
    rows = read_corpus(corpus.path, ["pmid", "text"]).to_pylist()
    rows[1500]["text"] = None  # in the second batch: the first batch's tokens are already written

    def write_bad_corpus(work):
        write_corpus(work, pa.Table.from_pylist(rows))

    bad = session_store.get_or_build(ArtifactSpec("corpus", "test-bad-row", {}), write_bad_corpus)
    with pytest.raises(ValueError, match=f"record pmid={rows[1500]['pmid']} has a null pmid or text"):
        SHARDS.run(session_store, {"corpus": bad, "tokenizer": tokenizer}, CONFIG)
    spec = SHARDS.spec({"corpus": bad, "tokenizer": tokenizer}, CONFIG)
    assert session_store.get(spec.ref) is None
    assert not session_store.work_dir(spec).exists()  # the half-written shards went with the failure


def test_a_vocabulary_too_large_for_uint16_is_refused(corpus, tmp_path):
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + [f"t{i}" for i in range(65_532)])}
    Tokenizer(models.BPE(vocab, [], unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: vocabulary of 65536 tokens does not fit uint16"):
        encode_corpus(corpus.path, tmp_path / "tokenizer.json", tmp_path / "out", **SPLIT)
    assert not (tmp_path / "out").exists()


def test_a_corpus_without_text_is_refused_naming_the_file(corpus, tokenizer, tmp_path):
    bad = write_corpus(tmp_path / "no-text", read_corpus(corpus.path, ["pmid", "title"]))
    with pytest.raises(ValueError, match=r"no-text/part-0000\.parquet: no column\(s\) \['text'\]"):
        encode_corpus(bad, tokenizer.file("tokenizer.json"), tmp_path / "out", **SPLIT)

    bad = write_corpus(tmp_path / "null-text", pa.table({"pmid": [1, 2], "text": ["Title\n\nAbstract.", None]}))
    with pytest.raises(ValueError, match="null-text: record pmid=2 has a null pmid or text"):
        encode_corpus(bad, tokenizer.file("tokenizer.json"), tmp_path / "out", **SPLIT)

    with pytest.raises(ValueError, match=r"part-0000\.parquet: not a corpus snapshot \(Not a directory: .*expected a folder with parts\.json"):
        encode_corpus(tmp_path / "no-text" / "part-0000.parquet", tokenizer.file("tokenizer.json"), tmp_path / "out", **SPLIT)

    listing = json.loads((bad / "parts.json").read_text())
    listing["parts"][0]["file"] = "../no-text/part-0000.parquet"  # a listing may not reach outside its folder
    (bad / "parts.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"null-text: not a corpus snapshot \(ValueError: names outside the folder: \['\.\./no-text/part-0000\.parquet'\]\)"):
        encode_corpus(bad, tokenizer.file("tokenizer.json"), tmp_path / "out", **SPLIT)
