"""Log-likelihoods of text under a causal LM, computed the way lm-evaluation-harness's HFLM does,
and greedy generation.

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
- Generation (generate_until): greedy, the context left-truncated to leave room for the new
  tokens, the text cut before the first stop string; EOS ends it too.

The prefix token: HFLM uses [BOS] (else EOS). Our pretraining separates documents with [EOS] and
never shows [BOS], so ``TransformerLM`` conditions on [EOS]; compare with lm-eval by passing
``prefix_token_id=3`` to HFLM (the tests and benchmarks/evaluate.py do).

Speed, beyond HFLM, none of it changing a number beyond float rounding:

- each context is encoded once; with GPT-2's byte-level pre-tokenizer (ours) a continuation is
  encoded with the context's last line only, which gives the same tokens (``splits_at_line_starts``);
- a multiple-choice item is one row: its context once, then every option's tokens, each option
  seeing the context and itself (positions and an attention mask say so), instead of one row per
  option; rows of similar length are batched;
- vocabulary logits are computed only at the positions that are scored;
- generation runs many prompts as one batch, padded on the left, each new token from the key/value
  cache of those before.
"""

from __future__ import annotations

import functools
import inspect
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from model.model import KVCache, Transformer, next_token
from model.threads import ThreadTuner

Score = tuple[float, bool]  # (sum of log-probabilities of the continuation, is_greedy)
PAD = 0  # filler id for padding; padded positions are never read


def splits_at_line_starts(tokenizer) -> bool:
    """Whether a ``tokenizers.Tokenizer`` encodes text from a line start on the same whatever text
    came before it: then a continuation's tokens follow from the context's last line alone.

    True for GPT-2's byte-level BPE without a normalizer (ours): its pre-tokenizer regex has no
    look-behind and never joins a newline to a printable character after it, so a line that starts
    with one starts a pre-token, and BPE works within pre-tokens. Added tokens must hold no newline,
    and special tokens may only be added in front.
    """
    from tokenizers import pre_tokenizers

    pre = tokenizer.pre_tokenizer
    if tokenizer.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel) or not pre.use_regex or pre.add_prefix_space:
        return False
    if any("\n" in token.content for token in tokenizer.get_added_tokens_decoder().values()):
        return False
    special, plain = tokenizer.encode("a\nb").ids, tokenizer.encode("a\nb", add_special_tokens=False).ids
    return special[len(special) - len(plain) :] == plain


def last_line_start(text: str) -> int:
    """Where text's last line that starts with a printable ASCII character other than space
    starts (0: no such line after the first)."""
    newline = text.rfind("\n")
    while newline >= 0:
        if "!" <= text[newline + 1 : newline + 2] <= "~":
            return newline + 1
        newline = text.rfind("\n", 0, newline)
    return 0


def _tuned(method: Callable) -> Callable:
    """``method`` with its forward passes inside ``threads()``: one tuner for the call, or the caller's."""

    @functools.wraps(method)
    def tuned(self, *args, **kwargs):
        with self.threads():
            return method(self, *args, **kwargs)

    return tuned


class CausalLM:
    """Scoring for any causal LM; a back end supplies encode/decode and the network calls below."""

    def __init__(self, max_length: int, prefix_token_id: int, eos_token_id: int | None, device: torch.device, batch_tokens: int = 2048,
                 line_split: bool = False):
        self.max_length = max_length
        self.prefix_token_id = prefix_token_id
        self.eos_token_id = eos_token_id
        self.device = device
        # Tokens per forward pass. Perplexity scores every position: its logits take about
        # batch_tokens x vocab x 4 bytes (262 MB at 2048 x 32k), twice that with their log-softmax.
        self.batch_tokens = batch_tokens
        self.line_split = line_split  # the tokenizer splits at line starts (splits_at_line_starts)
        self.tuner: ThreadTuner | None = None  # inside ``threads``: the count the forward passes run on
        self.passes = 0

    # -- what a back end implements ----------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def new_cache(self, max_len: int) -> Any:
        """An empty key/value cache for sequences of up to max_len tokens."""
        raise NotImplementedError

    def logits(self, ids: torch.Tensor, cache: Any = None, at: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of ids (B, T), after the cached tokens if a cache is given (which it then
        extends); at positions ``at`` (B, P) only, else at every position. ``positions`` (B, T) and
        ``mask`` (B, 1, T, cached + T; True where a token may look) lay out rows that are not one
        plain sequence (model/model.py ``Transformer.forward``)."""
        raise NotImplementedError

    @contextmanager
    def threads(self, count: int | None = None) -> Iterator[None]:
        """The forward passes inside the block on ``count`` threads; None: those of an enclosing
        block, else the default count, kept to the faster of it and one thread while the load
        changes (model/threads.py). The process's count is as before after it."""
        if count is None and self.tuner is not None:
            yield
            return
        outer, self.tuner = self.tuner, ThreadTuner.for_device(self.device, "scoring", count, start_on_one=True)
        try:
            yield
        finally:
            self.tuner.close()
            self.tuner = outer

    def _forward(self, ids: torch.Tensor, **layout) -> torch.Tensor:
        """``logits``, timed for the thread tuner (per token: passes differ in size)."""
        start = time.perf_counter()
        logits = self.logits(ids, **layout)
        self.passes += 1
        self.tuner.after_step(time.perf_counter() - start, self.passes, work=ids.numel())
        return logits

    # -- tokenisation, as lm-eval's HFLM does it ---------------------------------------------

    def encode_request(self, context: str, continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) token ids per continuation, split the way lm-eval splits them,
        the context encoded once (see the module doc)."""
        if context == "":
            conts = [self.encode(c, add_special_tokens=False) for c in continuations]
            return [([self.prefix_token_id], c) if c[:1] != [self.prefix_token_id] else (c[:1], c[1:]) for c in conts]
        stripped = context.rstrip()
        spaces = context[len(stripped) :]
        ctx = self.encode(stripped)
        # lm-eval encodes context + continuation whole; from a line start on, the same tokens come
        # from that line alone, when the tokenizer splits there.
        line = last_line_start(stripped) if self.line_split else 0
        tail = self.encode(stripped[line:], add_special_tokens=False) if line else ctx
        pairs = []
        for continuation in continuations:
            cont = self.encode(stripped[line:] + spaces + continuation, add_special_tokens=not line)[len(tail) :]
            if not ctx or not cont:
                raise ValueError(f"context {stripped[-40:]!r} or continuation {continuation[:40]!r} encodes to no tokens")
            pairs.append((ctx, cont))
        return pairs

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split the way lm-eval splits them."""
        return self.encode_request(context, [continuation])[0]

    def truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context tokens that fit: lm-eval keeps the last max_length + 1 of context + continuation."""
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens is longer than the model's {self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return ctx[-keep:]

    # -- scoring ---------------------------------------------------------------------------------

    @torch.inference_mode()
    @_tuned
    def loglikelihoods(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[Score]]:
        """For each (context, continuations) item, (log P(continuation | context), is_greedy) per continuation."""
        results: list[list[Score | None]] = [[None] * len(conts) for _, conts in requests]
        # A row per context as the model reads it, with every distinct continuation after it: an
        # item's options share one unless truncation cuts longer ones' contexts shorter, and items
        # that ask with the same context (a prompt zero-shot letters and cloze share) share one.
        rows: dict[tuple[int, ...], dict[tuple[int, ...], list[tuple[int, int]]]] = {}
        for i, (context, continuations) in enumerate(requests):
            for j, (ctx, cont) in enumerate(self.encode_request(context, continuations)):
                rows.setdefault(tuple(self.truncate(ctx, cont)), {}).setdefault(tuple(cont), []).append((i, j))
        length = lambda row: len(row[0]) + sum(len(cont) - 1 for cont in row[1])  # noqa: E731
        # Rows of one-token continuations are plain causal sequences, which attention runs faster
        # without a mask: they are batched apart.
        for plain in (True, False):
            pool = [row for row in rows.items() if (length(row) == len(row[0])) == plain]
            for batch in self._batches(pool, length):
                for (_, conts), scores in zip(batch, self._score_rows([(list(ctx), [list(c) for c in conts]) for ctx, conts in batch])):
                    for asked, score in zip(conts.values(), scores):
                        for i, j in asked:
                            results[i][j] = score
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[tuple[list[int], list[list[int]]]]) -> list[list[Score]]:
        """One forward pass for a batch of (context, continuations) rows.

        A row is the context, then each continuation but its last token; a continuation's tokens
        sit at the positions after the context and see the context and themselves only, so each is
        computed as if it alone followed the context. Its first token is predicted at the context's
        last position, the others at its own. The scored positions of one continuation are
        contiguous, and its log-probabilities are summed in fp32 as lm-eval sums them.
        """
        ids, positions, segments, at, targets = [], [], [], [], []
        for ctx, conts in rows:
            ids.append(list(ctx))
            positions.append(list(range(len(ctx))))
            segments.append([0] * len(ctx))
            at.append([])
            targets.append([])
            for s, cont in enumerate(conts, 1):
                start = len(ids[-1])
                at[-1] += [len(ctx) - 1] + list(range(start, start + len(cont) - 1))
                targets[-1] += cont
                ids[-1] += cont[:-1]
                positions[-1] += range(len(ctx), len(ctx) + len(cont) - 1)
                segments[-1] += [s] * (len(cont) - 1)
        ids_t = self._padded(ids, PAD)
        layout = {}
        if any(len(cont) > 1 for _, conts in rows for cont in conts):
            segments_t = self._padded(segments, -1)  # padding: its own segment, seeing the context (never read)
            causal = torch.ones(ids_t.size(1), ids_t.size(1), dtype=torch.bool, device=self.device).tril()
            mask = causal & ((segments_t[:, None, :] == 0) | (segments_t[:, None, :] == segments_t[:, :, None]))
            layout = {"positions": self._padded(positions, 0), "mask": mask[:, None]}
        logits = self._forward(ids_t, at=self._padded(at, 0), **layout)
        logprobs = torch.log_softmax(logits, dim=-1)
        targets_t = self._padded(targets, 0)
        chosen = logprobs.gather(2, targets_t[:, :, None])[:, :, 0]
        greedy = logprobs.argmax(dim=-1) == targets_t
        scores = []
        for r, (_, conts) in enumerate(rows):
            scores.append([])
            end = 0
            for cont in conts:
                start, end = end, end + len(cont)
                scores[-1].append((float(chosen[r, start:end].sum()), bool(greedy[r, start:end].all())))
        return scores

    @torch.inference_mode()
    @_tuned
    def rolling_loglikelihoods(self, documents: Sequence[Sequence[int]], stride: int | None = None) -> list[float]:
        """Total log-probability of each token list, each document on its own (see the module doc)."""
        windows = [
            (d, ids, scored)
            for d, tokens in enumerate(documents)
            for ids, scored in rolling_windows(list(tokens), self.prefix_token_id, self.max_length, stride or self.max_length)
        ]
        totals = [0.0] * len(documents)
        for batch in self._batches(windows, lambda w: len(w[1]) - 1):
            ids = self._padded([window[:-1] for _, window, _ in batch], PAD)
            lengths = [len(window) - 1 for _, window, _ in batch]
            width = max(scored for _, _, scored in batch)
            # Per row, the last `width` positions (clamped at 0: duplicates there are never read).
            at = torch.stack([torch.arange(n - width, n, device=self.device).clamp(min=0) for n in lengths])
            logprobs = torch.log_softmax(self._forward(ids, at=at), dim=-1)
            for row, (d, window, scored) in enumerate(batch):
                targets = self._tensor(window[-scored:])
                totals[d] += float(logprobs[row, width - scored :].gather(1, targets[:, None]).sum())
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate(self, context: str, max_new_tokens: int, until: Sequence[str] = ("\n\n",)) -> str:
        """Greedy continuation of context, cut before the first stop string; stops at EOS too."""
        return self.generate_many([context], max_new_tokens, until)[0]

    def generate_many(self, contexts: Sequence[str], max_new_tokens: int, until: Sequence[str] = ("\n\n",)) -> list[str]:
        """``generate`` for each context: the text of its ``greedy`` tokens, cut before the first stop string."""
        texts = []
        for ids in self.greedy(contexts, max_new_tokens, until):
            text = self.decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts

    @torch.inference_mode()
    @_tuned
    def greedy(self, contexts: Sequence[str], max_new_tokens: int, until: Sequence[str] = ()) -> list[list[int]]:
        """The greedy tokens after each context (left-truncated to leave room for them): up to
        EOS (left out), the token that completes a stop string, or max_new_tokens.

        Contexts of similar length run as one batch: each gets the tokens it gets alone
        (tests/test_scoring.py), in a fraction of the forward passes.
        """
        prompts = [self._prompt(context, max_new_tokens) for context in contexts]
        new: list[list[int]] = [[] for _ in contexts]
        for batch in self._batches(list(range(len(contexts))), lambda i: len(prompts[i]) + max_new_tokens):
            running = set(batch)
            for tokens in self._steps([prompts[i] for i in batch], max_new_tokens):
                for i, token in zip(batch, tokens.tolist()):
                    if i not in running:
                        continue
                    if token == self.eos_token_id:
                        running.discard(i)
                        continue
                    new[i].append(token)
                    if any(stop in self.decode(new[i]) for stop in until):
                        running.discard(i)
                if not running:
                    break
        return new

    @torch.inference_mode()
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
        with self.threads():  # while the tokens come
            for (token,) in self._steps([self._prompt(context, max_new_tokens)], max_new_tokens, temperature, top_p, generator):
                if int(token) == self.eos_token_id:
                    return
                yield int(token)

    def _prompt(self, context: str, max_new_tokens: int) -> list[int]:
        """The context's tokens that leave room for max_new_tokens (the last ones)."""
        if not 0 < max_new_tokens < self.max_length:
            raise ValueError(f"max_new_tokens must be in [1, {self.max_length}), got {max_new_tokens}")
        return self.encode(context)[-(self.max_length - max_new_tokens) :]

    def _steps(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """The next token of every prompt (B,), step after step, max_new_tokens times.

        The prompts are padded on the left into one batch: every row's next token goes in the same
        cache slot. Each row's positions count from its own first token, and no real token sees
        padding, so a row computes as it would alone. A padded slot sees itself only (a row of its
        attention that is never read, and never all masked).
        """
        width = max(len(p) for p in prompts)
        slots = torch.arange(width + max_new_tokens, device=self.device)
        pad = self._tensor([width - len(p) for p in prompts])[:, None]
        ids = self._tensor([[PAD] * (width - len(p)) + p for p in prompts])
        real = slots[None, :] >= pad  # (B, slots): the slots that hold a row's own tokens
        prefill = (slots[:width, None] >= slots[None, :width]) & (real[:, None, :width] | torch.eye(width, dtype=torch.bool, device=self.device))
        cache = self.new_cache(width + max_new_tokens)
        logits = self._forward(ids, cache=cache, at=torch.full_like(pad, width - 1), positions=(slots[None, :width] - pad).clamp(min=0), mask=prefill[:, None])
        for step in range(max_new_tokens):
            if step:
                slot = width + step - 1
                logits = self._forward(token, cache=cache, positions=slot - pad, mask=real[:, None, None, : slot + 1])
            token = next_token(logits[:, -1], None, temperature, None, top_p, 1.0, generator)
            yield token[:, 0]

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

    def _padded(self, rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
        """A (B, longest) batch, each row padded at the end with ``fill``: causal attention never looks right."""
        width = max(len(r) for r in rows)
        return self._tensor([list(r) + [fill] * (width - len(r)) for r in rows])


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
        super().__init__(model.config.context_length, prefix_token_id, eos_token_id, device, batch_tokens, splits_at_line_starts(tokenizer))

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

    def logits(self, ids, cache=None, at=None, positions=None, mask=None):
        return self.model(ids, kv_cache=cache, logit_positions=at, positions=positions, attn_mask=mask)[0].float()


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
        line_split = tokenizer.is_fast and splits_at_line_starts(tokenizer.backend_tokenizer)
        super().__init__(max_length, prefix_token_id, tokenizer.eos_token_id, model.device, batch_tokens, line_split)

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

    def logits(self, ids, cache=None, at=None, positions=None, mask=None):
        if mask is not None:  # transformers takes a 4D mask as it is; additive, so that eager attention takes it too
            mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(self.model.dtype).min)
        out = self.model(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=cache is not None,
            logits_to_keep=0 if at is None else at, **{self._cache_arg: cache},
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
