"""Log-likelihoods of text under a causal LM, computed the way lm-evaluation-harness's HFLM does.

One interface, ``CausalLM``, for our ``Transformer`` with a ``tokenizers.Tokenizer``
(``TransformerLM``) and for a local Hugging Face model folder (``HFCausalLM``). The scoring rules
live once, in ``CausalLM``; a back end only encodes/decodes text and runs its network.

Rules copied from lm-eval 0.4.13 (``api/model.py`` and ``models/huggingface.py``), so the numbers
agree to float rounding:

- A (context, continuation) pair: trailing spaces of the context move to the front of the
  continuation; the context is encoded alone, the continuation's tokens are the tail of
  encode(context + continuation) after as many tokens as the context alone has. Encoding uses the
  tokenizer's own special-token setting (HFLM's default, ``add_bos_token=None``): our tokenizer
  has no post-processor, so no [BOS] is added. An empty context becomes the prefix token.
- Too long: the last max_length + 1 tokens of context + continuation are kept (left truncation).
- is_greedy: every continuation token is the argmax of its position.
- Rolling log-likelihood (perplexity): a document is conditioned on the prefix token and cut into
  windows of max_length tokens; with the default stride (= max_length) windows are disjoint, as in
  HFLM, and the last window is filled up with earlier tokens as context. A smaller stride gives
  every scored token at least max_length - stride tokens of context.

The prefix token: HFLM uses [BOS] (else EOS). Our pretraining separates documents with [EOS] and
never shows [BOS], so ``TransformerLM`` conditions on [EOS]; compare with lm-eval by passing
``prefix_token_id=3`` to HFLM (the tests and benchmarks/evaluate.py do).

Speed, beyond HFLM: the context of a multiple-choice item runs once and all its options are scored
from its cached keys/values (expanded over the options batch); items whose options are all one
token long (" A", " yes") need only the context's last position and are batched together; and
vocabulary logits are computed only at the positions that are scored.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from model.model import KVCache, Transformer, next_token

Score = tuple[float, bool]  # (sum of log-probabilities of the continuation, is_greedy)
PAD = 0  # filler id for right padding; padded positions are never read


class CausalLM:
    """Scoring for any causal LM; a back end supplies encode/decode and the network calls below."""

    def __init__(self, max_length: int, prefix_token_id: int, eos_token_id: int | None, device: torch.device, batch_tokens: int = 2048):
        self.max_length = max_length
        self.prefix_token_id = prefix_token_id
        self.eos_token_id = eos_token_id
        self.device = device
        # Tokens per forward pass. Perplexity scores every position: its logits take about
        # batch_tokens x vocab x 4 bytes (262 MB at 2048 x 32k), twice that with their log-softmax.
        self.batch_tokens = batch_tokens

    # -- what a back end implements ----------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def new_cache(self, max_len: int) -> Any:
        """An empty key/value cache for one sequence of up to max_len tokens."""
        raise NotImplementedError

    def expand_cache(self, cache: Any, batch: int, max_len: int) -> Any:
        """The one-row ``cache`` repeated over ``batch`` rows, with room for max_len tokens."""
        raise NotImplementedError

    def logits(self, ids: torch.Tensor, cache: Any = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of ids (B, T), after the cached tokens if a cache is given (which it then
        extends); at positions (B, P) only, else at every position."""
        raise NotImplementedError

    # -- tokenisation, as lm-eval's HFLM does it ---------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split the way lm-eval splits them."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.encode(context)
        cont = self.encode(context + continuation)[len(ctx) :]
        if not ctx or not cont:
            raise ValueError(f"context {context[-40:]!r} or continuation {continuation[:40]!r} encodes to no tokens")
        return ctx, cont

    def truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context tokens that fit: lm-eval keeps the last max_length + 1 of context + continuation."""
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens is longer than the model's {self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return ctx[-keep:]

    # -- scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihoods(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[Score]]:
        """For each (context, continuations) item, (log P(continuation | context), is_greedy) per continuation."""
        results: list[list[Score | None]] = [[None] * len(conts) for _, conts in requests]
        one_token: list[tuple[int, list[int], list[tuple[int, list[int]]]]] = []
        for i, (context, continuations) in enumerate(requests):
            # Options that keep the same context tokens share one run of it (they differ only
            # when truncation cuts longer options' contexts shorter).
            groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
            for j, continuation in enumerate(continuations):
                ctx, cont = self.encode_pair(context, continuation)
                groups.setdefault(tuple(self.truncate(ctx, cont)), []).append((j, cont))
            for ctx, members in groups.items():
                if all(len(cont) == 1 for _, cont in members):
                    one_token.append((i, list(ctx), members))
                else:
                    for j, score in self._score_shared_context(list(ctx), members):
                        results[i][j] = score
        for i, j, score in self._score_last_positions(one_token):
            results[i][j] = score
        return results  # type: ignore[return-value]

    def _score_last_positions(self, groups):
        """Groups of one-token continuations need only their context's last logits: batch many contexts."""
        for batch in self._batches(groups, lambda g: len(g[1])):
            ids, lengths = self._right_pad([ctx for _, ctx, _ in batch])
            positions = torch.tensor([[n - 1] for n in lengths], device=self.device)
            logprobs = torch.log_softmax(self.logits(ids, positions=positions)[:, 0], dim=-1)
            greedy = logprobs.argmax(dim=-1)
            for row, (i, _, members) in enumerate(batch):
                for j, (token,) in members:
                    yield i, j, (float(logprobs[row, token]), bool(greedy[row] == token))

    def _score_shared_context(self, ctx: list[int], members: list[tuple[int, list[int]]]):
        """Run ctx once, then every continuation as one batch on its cached keys/values."""
        longest = max(len(cont) for _, cont in members)
        max_len = len(ctx) + longest - 1
        cache = self.new_cache(max_len)
        last = self.logits(self._tensor([ctx]), cache, positions=self._tensor([[len(ctx) - 1]]))
        first = torch.log_softmax(last[0, 0], dim=-1)  # predicts every continuation's first token
        rest = None
        if longest > 1:
            cache = self.expand_cache(cache, len(members), max_len)
            ids, _ = self._right_pad([cont[:-1] for _, cont in members], width=longest - 1)
            rest = torch.log_softmax(self.logits(ids, cache), dim=-1)  # (options, longest - 1, vocab)
        for row, (j, cont) in enumerate(members):
            logprob = first[cont[0]]
            greedy = bool(first.argmax() == cont[0])
            if len(cont) > 1:
                targets = self._tensor(cont[1:])
                steps = rest[row, : len(cont) - 1]
                logprob = logprob + steps.gather(1, targets[:, None]).sum()
                greedy = greedy and bool((steps.argmax(dim=-1) == targets).all())
            yield j, (float(logprob), greedy)

    @torch.no_grad()
    def rolling_loglikelihoods(self, documents: Sequence[Sequence[int]], stride: int | None = None) -> list[float]:
        """Total log-probability of each token list, each document on its own (see the module doc)."""
        windows = [
            (d, ids, scored)
            for d, tokens in enumerate(documents)
            for ids, scored in rolling_windows(list(tokens), self.prefix_token_id, self.max_length, stride or self.max_length)
        ]
        totals = [0.0] * len(documents)
        for batch in self._batches(windows, lambda w: len(w[1]) - 1):
            ids, lengths = self._right_pad([window[:-1] for _, window, _ in batch])
            width = max(scored for _, _, scored in batch)
            # Per row, the last `width` positions (clamped at 0: duplicates there are never read).
            positions = torch.stack([torch.arange(n - width, n, device=self.device).clamp(min=0) for n in lengths])
            logprobs = torch.log_softmax(self.logits(ids, positions=positions), dim=-1)
            for row, (d, window, scored) in enumerate(batch):
                targets = self._tensor(window[-scored:])
                totals[d] += float(logprobs[row, width - scored :].gather(1, targets[:, None]).sum())
        return totals

    @torch.no_grad()
    def generate(self, context: str, max_new_tokens: int, until: Sequence[str] = ("\n\n",)) -> str:
        """Greedy continuation of context, cut before the first stop string; stops at EOS too.

        As lm-eval's generate_until: the context is left-truncated to leave room for max_new_tokens.
        """
        new: list[int] = []
        for token in self.continuation(context, max_new_tokens):
            new.append(token)
            if any(stop in self.decode(new) for stop in until):
                break
        text = self.decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text

    @torch.no_grad()
    def stream(self, context: str, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
               generator: torch.Generator | None = None) -> Iterator[str]:
        """The continuation of context as text, piece by piece as tokens arrive, until EOS or
        max_new_tokens; greedy at temperature 0, else sampled (model/model.py ``next_token``)."""
        new: list[int] = []
        text = shown = ""
        for token in self.continuation(context, max_new_tokens, temperature, top_p, generator):
            new.append(token)
            text = self.decode(new)
            if not text.endswith("\ufffd"):  # else a character whose bytes have not all come yet
                yield text[len(shown):]
                shown = text
        if text != shown:  # stopped inside a character: what generate() returns
            yield text[len(shown):]

    def continuation(self, context: str, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
                     generator: torch.Generator | None = None) -> Iterator[int]:
        """Token ids after context (left-truncated to leave room for them), each computed from the
        key/value cache of those before, until EOS (not yielded) or max_new_tokens."""
        if not 0 < max_new_tokens < self.max_length:
            raise ValueError(f"max_new_tokens must be in [1, {self.max_length}), got {max_new_tokens}")
        ctx = self.encode(context)[-(self.max_length - max_new_tokens) :]
        history = self._tensor([ctx])
        cache = self.new_cache(len(ctx) + max_new_tokens)
        logits = self.logits(history, cache, positions=self._tensor([[len(ctx) - 1]]))
        for i in range(max_new_tokens):
            if i:
                logits = self.logits(history[:, -1:], cache)
            token = next_token(logits[:, -1], history, temperature, None, top_p, 1.0, generator)
            if int(token) == self.eos_token_id:
                return
            history = torch.cat((history, token), dim=1)
            yield int(token)

    # -- helpers ---------------------------------------------------------------------------------

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _batches(self, items: list, length) -> list[list]:
        """Items sorted by length, cut into batches whose padded size stays within batch_tokens."""
        batches: list[list] = [[]]
        for item in sorted(items, key=length):
            if batches[-1] and (len(batches[-1]) + 1) * length(item) > self.batch_tokens:
                batches.append([])
            batches[-1].append(item)
        return [b for b in batches if b]

    def _right_pad(self, rows: Sequence[Sequence[int]], width: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """A (B, width) batch, each row padded at the end: causal attention never looks right."""
        lengths = [len(r) for r in rows]
        width = width or max(lengths)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, lengths


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(window, n_scored): the model reads window[:-1] and predicts its last n_scored tokens.

    lm-eval's get_rolling_token_windows + make_disjoint_window with context_len = max_length -
    stride + 1: the first window predicts up to max_length tokens after the prefix token; each
    next one predicts up to ``stride`` new tokens and reads max_length tokens in all.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, {max_length}], got {stride}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[:first], first)]
    predicted = first
    while predicted < len(tokens):
        scored = min(len(tokens) - predicted, stride)
        end = predicted + scored
        windows.append((tokens[end - max_length - 1 : end], scored))
        predicted = end
    return windows


class TransformerLM(CausalLM):
    """Our Transformer with its tokenizers.Tokenizer (as storage.formats.load_tokenizer returns it).

    Ids 3 = [EOS] by the shards' contract (storage/formats.py): it ends generation and, as the
    token every pretraining document follows, is the prefix token.
    """

    def __init__(self, model: Transformer, tokenizer, prefix_token_id: int = 3, eos_token_id: int = 3, batch_tokens: int = 2048):
        self.model = model.eval()
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        super().__init__(model.config.context_length, prefix_token_id, eos_token_id, device, batch_tokens)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, tokenizer, device: str = "cpu", **kwargs) -> "TransformerLM":
        """A checkpoint folder and its tokenizer (storage.formats.load_tokenizer's result)."""
        from model.checkpoint import load_checkpoint_config, load_model

        eos = (load_checkpoint_config(checkpoint_dir).get("tokens") or {}).get("eos_id", 3)
        return cls(load_model(checkpoint_dir, device), tokenizer, prefix_token_id=eos, eos_token_id=eos, **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.model.config.n_layer, max_len)

    def expand_cache(self, cache: KVCache, batch: int, max_len: int) -> KVCache:
        return cache.expand(batch, max_len)

    def logits(self, ids, cache=None, positions=None):
        return self.model(ids, kv_cache=cache, logit_positions=positions)[0].float()


class HFCausalLM(CausalLM):
    """A transformers causal LM and its tokenizer, e.g. a folder written by model/export_hf.py."""

    def __init__(self, model, tokenizer, prefix_token_id: int | None = None, max_length: int | None = None, batch_tokens: int = 2048):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if prefix_token_id is None:  # HFLM's choice
            prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if max_length is None:  # HFLM's lookup order
            found = [getattr(model.config, a) for a in ("n_positions", "max_position_embeddings", "n_ctx") if getattr(model.config, a, None)]
            if not found:
                raise ValueError("the model config names no context length (n_positions, max_position_embeddings, n_ctx); pass max_length")
            max_length = found[0]
        # transformers renamed past_key_values to cache (5.x); use whichever this version takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        super().__init__(max_length, prefix_token_id, tokenizer.eos_token_id, model.device, batch_tokens)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> "HFCausalLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
        return cls(model, tokenizer, **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def new_cache(self, max_len: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def expand_cache(self, cache, batch: int, max_len: int):
        cache.batch_repeat_interleave(batch)
        return cache

    def logits(self, ids, cache=None, positions=None):
        out = self.model(
            input_ids=ids, use_cache=cache is not None, logits_to_keep=0 if positions is None else positions, **{self._cache_arg: cache}
        )
        return out.logits.float()


def load_causal_lm(folder: str | Path, device: str = "cpu") -> CausalLM:
    """Our checkpoint folder (weights, config and tokenizer files), or a Hugging Face model folder
    (an hf_model artifact, or a model fine-tuned from one)."""
    from model.checkpoint import is_hf_folder
    from storage.formats import TOKENIZER_FILE, load_tokenizer

    if is_hf_folder(folder):
        return HFCausalLM.from_folder(folder, device)
    return TransformerLM.from_checkpoint(folder, load_tokenizer(Path(folder) / TOKENIZER_FILE), device)
