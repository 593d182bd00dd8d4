"""The medlm decoder: one readable file in the spirit of nanoGPT's model.py.

Two architectures share every module: ``llama`` (RoPE, RMSNorm, SwiGLU, no biases) and
``gpt2`` (learned positions, LayerNorm, GELU, biases). Weights map one to one onto
``transformers.LlamaForCausalLM`` and ``GPT2LMHeadModel`` (see model/export_hf.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value add no loss (SFT masks the prompt with it)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    d_model: int = 768
    context_length: int = 2048
    mlp_hidden: int | None = None  # None: 8/3·d_model rounded up to a multiple of 64 (llama), 4·d_model (gpt2)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    arch: Literal["llama", "gpt2"] = "llama"

    def __post_init__(self):
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"arch must be 'llama' or 'gpt2', got {self.arch!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.d_model if self.arch == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; d_model/n_head is {self.head_dim}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        # Built from the preset's arguments, not a resolved config, so derived fields
        # (n_kv_head, mlp_hidden) follow overrides such as n_head or d_model.
        return cls(**(PRESETS[name] | overrides))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # CPU tests and the demo: ~4.9M parameters at a 32k vocabulary, most of them the embedding.
    "tiny": dict(n_layer=4, n_head=4, d_model=128, context_length=256),
    "small": dict(n_layer=6, n_head=6, d_model=384, context_length=1024),
    "base": dict(n_layer=12, n_head=12, d_model=768, context_length=2048),  # ~110M
    # GPT-2 small's shape, on our 32k tokenizer.
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, context_length=1024, arch="gpt2"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim) in the rotate-half layout HF Llama uses."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by position: pairs are (i, i + head_dim/2), not adjacent."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to max_len."""

    def __init__(self, n_layer: int, max_len: int):
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, kv_heads, T, head_dim) keys/values; return all of them so far."""
        if self.k is None:  # allocated on first use, so it takes the autocast dtype of k
            shape = (self.n_layer, k.size(0), k.size(1), self.max_len, k.size(3))
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        bias = cfg.arch == "gpt2"
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, kv_cache: KVCache | None, attn_mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        if self.n_kv_head != self.n_head:  # GQA: each key/value head serves a group of query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # Queries and keys over the same positions: the plain causal mask. One new token
            # after cached ones attends to all of them (no mask); several get attn_mask.
            is_causal=attn_mask is None and k.size(2) == T,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.d_model, cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = GeluMLP(cfg) if cfg.arch == "gpt2" else SwiGLU(cfg)

    def forward(self, x, rope, kv_cache, attn_mask):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rotary_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
            # Not persistent: derived from the config, so they never go into checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scale the projections that write into the residual stream so its variance
        # does not grow with depth (GPT-2 paper, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters counted once each (tied embeddings are one matrix)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention.

        N leaves out lookup tables that do no matmul: the position table, and the token table
        unless it doubles as the output projection. The attention term is PaLM's 12·L·d·T.
        """
        cfg = self.config
        n = self.num_params()
        if self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        if not cfg.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * (seq_len or cfg.context_length)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logit_positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy over targets != -100.

        With a KV cache, idx holds only the new tokens; they sit at positions after the cached ones.
        logit_positions (B, P), indices into idx's T, returns logits (B, P, vocab) at those positions
        only: scoring needs a few, and in a small model the vocabulary projection costs more than
        all the blocks together.
        segments (B, T), for rows packed with several examples (fine-tuning): the example each token
        belongs to, in runs. A token attends only to earlier tokens of its own run, and positions
        restart at 0 where a run starts, so each example is computed exactly as if it were alone.
        positions (B, T) and attn_mask (B, 1, T, cached + T, True where a token may look), given
        together, lay out rows that are not one sequence from position 0: several answers after one
        shared context (scoring), or prompts padded on the left (batched generation).
        """
        if targets is not None and logit_positions is not None:
            raise ValueError("pass targets or logit_positions, not both: the loss needs every position's logits")
        if segments is not None and kv_cache is not None:
            raise ValueError("segments are for packed training rows; generation with a KV cache takes one sequence per row")
        if (positions is None) != (attn_mask is None) or (positions is not None and segments is not None):
            raise ValueError("pass positions and attn_mask together, and not with segments")
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if positions is not None:
            if int(positions.max()) >= self.config.context_length:
                raise ValueError(f"position {int(positions.max())} is past the model's context_length ({self.config.context_length})")
        elif start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context_length "
                f"({self.config.context_length}); crop the input"
            )
        else:
            positions = torch.arange(start, start + T, device=idx.device)
            # Several new tokens after cached ones: each sees the cache and the new ones up to itself.
            if start > 0 and T > 1:
                attn_mask = torch.arange(start + T, device=idx.device)[None, :] <= positions[:, None]
            if segments is not None:
                positions, attn_mask = packed_positions_and_mask(segments)
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = None
        if self.pos_emb is None:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if positions.dim() == 2:  # per-row positions (B, T, head_dim): broadcast over the heads
                rope = (rope[0][:, None], rope[1][:, None])
        for block in self.blocks:
            x = block(x, rope, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.length += T
        if logit_positions is not None:
            x = x.gather(1, logit_positions[:, :, None].expand(-1, -1, x.size(-1)))
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens; greedy when temperature == 0.

        Stops once every row has produced eos_id; finished rows are padded with eos_id.
        """
        if temperature < 0 or repetition_penalty <= 0:
            raise ValueError("temperature must be >= 0 and repetition_penalty > 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        was_training = self.training
        self.eval()
        ctx = self.config.context_length
        cache = KVCache(self.config.n_layer, ctx) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        new_tokens = idx
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + new_tokens.size(1) > ctx:
                # The window now slides, which shifts every position: cached keys are stale.
                cache = None
            if cache is None:
                logits, _ = self(idx[:, -ctx:])
            else:
                logits, _ = self(new_tokens, kv_cache=cache)
            token = next_token(logits[:, -1, :].float(), idx, temperature, top_k, top_p, repetition_penalty, generator)
            if eos_id is not None:
                token = torch.where(finished[:, None], torch.full_like(token, eos_id), token)
                finished |= token[:, 0] == eos_id
            idx = torch.cat((idx, token), dim=1)
            new_tokens = token
            if eos_id is not None and bool(finished.all()):
                break
        self.train(was_training)
        return idx


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Per-token positions (B, T) that restart at 0 where a run of equal segment ids starts."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def packed_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_positions, and the attention mask (B, 1, T, T): causal, and within a run only."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return segment_positions(segments), (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]


def next_token(logits, history, temperature, top_k, top_p, repetition_penalty, generator) -> torch.Tensor:
    """Pick one token per row (B, 1) from last-position logits (B, vocab)."""
    if repetition_penalty != 1.0:  # CTRL-style: push down every token already in the sequence
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
