"""The network: configs, equivalence with transformers, KV-cache generation, optimizer groups."""

import pytest
import torch

from model.export_hf import to_hf_model
from model.train import OptimConfig, adamw
from model.model import IGNORE_INDEX, PRESETS, KVCache, ModelConfig, Transformer

VOCAB = 97


def tiny(arch="llama", **overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=64, context_length=32, arch=arch)
    return ModelConfig(**(base | overrides))


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_presets_have_the_documented_sizes():
    with torch.device("meta"):
        sizes = {name: Transformer(ModelConfig.preset(name)).num_params() for name in PRESETS}
    assert 1e6 <= sizes["tiny"] <= 5e6
    assert 100e6 <= sizes["base"] <= 130e6
    base, gpt2 = ModelConfig.preset("base"), ModelConfig.preset("gpt2")
    assert (base.n_layer, base.d_model, base.n_head, base.context_length, base.vocab_size) == (12, 768, 12, 2048, 32000)
    assert (gpt2.arch, gpt2.context_length, gpt2.mlp_hidden) == ("gpt2", 1024, 4 * 768)
    assert base.mlp_hidden == 2048 and base.mlp_hidden % 64 == 0
    assert ModelConfig.preset("tiny", n_layer=1).n_layer == 1
    # Derived fields follow the overrides they derive from.
    small_heads = ModelConfig.preset("tiny", n_head=2, d_model=96)
    assert (small_heads.n_kv_head, small_heads.mlp_hidden) == (2, 256)


def test_config_round_trips_and_rejects_bad_values():
    cfg = tiny(n_kv_head=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="multiple of n_head"):
        tiny(d_model=66)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict(cfg.to_dict() | {"n_layers": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize(
    "cfg",
    [tiny("llama"), tiny("llama", n_kv_head=2, tie_embeddings=False, rope_theta=500.0), tiny("gpt2")],
    ids=["llama", "llama-gqa-untied", "gpt2"],
)
def test_logits_match_transformers(cfg):
    model = build(cfg)
    hf_model = to_hf_model(model)
    idx = torch.randint(0, VOCAB, (2, cfg.context_length))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_equals_uncached(arch):
    model = build(tiny(arch, n_kv_head=2 if arch == "llama" else None))
    prompt = torch.randint(0, VOCAB, (2, 5))
    # 40 new tokens run past the 32-token context, so the sliding-window fallback is covered too.
    cached = model.generate(prompt, 40, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)


def test_chunked_prefill_matches_one_full_forward():
    model = build(tiny(n_kv_head=2))
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer, model.config.context_length)
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_loss_ignores_masked_targets():
    model = build(tiny())
    idx = torch.randint(0, VOCAB, (1, 10))
    targets = idx.roll(-1, dims=1)
    masked = targets.clone()
    masked[:, :6] = IGNORE_INDEX
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 6:], targets[0, 6:])
    torch.testing.assert_close(loss, expected)


def test_forward_rejects_sequences_longer_than_the_context():
    model = build(tiny())
    with pytest.raises(ValueError, match="longer than the model's context_length"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_sampling_controls():
    model = build(tiny())
    prompt = torch.randint(0, VOCAB, (3, 4))
    greedy = model.generate(prompt, 6, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 6, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 6, top_p=1e-6, generator=g), greedy)
    sampled = model.generate(prompt, 6, temperature=1.5, top_k=10, top_p=0.9, repetition_penalty=1.3, generator=g)
    assert sampled.shape == (3, 10) and int(sampled.max()) < VOCAB
    # Stop at EOS: make the first greedy token the EOS id, then every row is done after one step.
    eos = int(greedy[0, 4])
    out = model.generate(prompt[:1], 6, temperature=0, eos_id=eos)
    assert out.shape == (1, 5) and int(out[0, -1]) == eos
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 1, top_p=0.0)


def test_repetition_penalty_changes_greedy_choice():
    model = build(tiny())
    prompt = torch.randint(0, VOCAB, (1, 4))
    penalised = model.generate(prompt, 12, temperature=0, repetition_penalty=100.0)
    new = penalised[0, 4:].tolist()
    assert len(set(new)) == len(new)  # a huge penalty forbids repeating anything already seen
    assert not set(new) & set(prompt[0].tolist())


def test_optimizer_decays_matrices_only_and_init_scales_residual_projections():
    model = build(tiny("gpt2", n_layer=4))
    opt = adamw(model, OptimConfig(weight_decay=0.1, lr=1e-3), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    residual = model.blocks[0].attn.o_proj.weight.std().item()
    assert residual == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_flops_per_token_counts_matmul_params_and_attention():
    cfg = tiny(tie_embeddings=False)
    model = build(cfg)
    matmul_params = model.num_params() - model.tok_emb.weight.numel()
    assert model.flops_per_token() == 6 * matmul_params + 12 * cfg.n_layer * cfg.d_model * cfg.context_length
