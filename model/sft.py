"""Supervised fine-tuning data: QA records -> prompt/completion tokens -> masked (x, y) batches.

Plain PyTorch, no Prefect. A canonical QA record (storage/formats.py) becomes a prompt and a
completion (``render``):

- template "eval": the evaluation prompt of model/prompts.py, ending "Answer:", and the
  completion " C" (MedQA/MedMCQA), " yes" (PubMedQA) or " <output>" (instruction data), as the
  evaluate stage scores it. With completion "letter+text" the option follows (" C. Warfarin"),
  with "letter+text+explanation" also the explanation ("\\nExplanation: ...") where there is one.
- template "instruction": the Alpaca template, "### Instruction:" (the question), "### Input:"
  (context and lettered options, when there are any), "### Response:\\n", and the same answer
  without the leading space.

Tokens (``encode_examples``): the prompt and prompt+completion are encoded as the tokenizer
would at inference, and the prompt's tokens must be a prefix of prompt+completion's; where a
BPE merge crosses the boundary they are not, and training would see a context the model never
sees at inference (TRL only warns): every such example is counted and the conversion fails,
naming the first and the fix. [EOS] ends every completion and is a target; only completion
tokens are targets (y = -100 on the prompt and on padding, by position, never by token id, so
an [EOS] is learned even where a tokenizer's pad token is [EOS]). A prompt too long for
max_length is cut from the left, as evaluation cuts it; an example whose completion alone does
not fit is dropped and counted.

Batches (``SFTBatches``), a pure function of (seed, step) so a resumed run sees the same data:
each epoch is a permutation of the examples drawn from (seed, epoch); "padding" puts one example
per row and pads each micro-batch to its longest row; "packing" fills rows of max_length tokens
with several examples (best fit, in the epoch's order) and passes ``segments`` so the model
keeps them apart (model/model.py: attention within an example only, positions restarting at 0).
A micro-batch without a single target raises: it would be a silent no-op (TRL's empty
assistant mask, trl#4147).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch

from model.model import IGNORE_INDEX
from model.prompts import TARGET_DELIMITER, doc_to_text, option_lines, prompting, target

TEMPLATES = ("eval", "instruction")
COMPLETIONS = ("letter", "letter+text", "letter+text+explanation")
ALPACA = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
ALPACA_INPUT = ", paired with an input that provides further context"
RESPONSE = "### Response:\n"


# -- records -> text ---------------------------------------------------------------------------


def answer(record: dict, completion: str = "letter") -> str:
    """The answer without a leading delimiter: "C", "C. Warfarin", "yes", or the instruction output."""
    if completion not in COMPLETIONS:
        raise ValueError(f"completion must be one of {COMPLETIONS}, got {completion!r}")
    if not record["options"]:
        return record["answer_text"].strip()
    words = prompting(record).answer_words  # PubMedQA's options are the answers: no letters
    text = target(record, "cloze" if words else "letters")[len(TARGET_DELIMITER):]
    if completion != "letter" and not words:
        text += ". " + record["options"][record["answer_idx"]]
    if completion == "letter+text+explanation" and (record["explanation"] or "").strip():
        text += "\nExplanation: " + record["explanation"].strip()
    return text


def instruction_parts(record: dict) -> tuple[str, str]:
    """(instruction, input) of the Alpaca template: the question; the context and the options."""
    return record["question"], "\n".join([*record["context"], *option_lines(record)])


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt, ending "### Response:\\n" (the variant without "### Input:" when input is empty)."""
    body = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{input}\n\n" if input else "")
    return ALPACA.format(ALPACA_INPUT if input else "") + body + RESPONSE


def render(record: dict, template: str = "eval", completion: str = "letter") -> tuple[str, str]:
    """(prompt, completion) text of a record; the completion does not include [EOS]."""
    if template == "eval":
        return doc_to_text(record), TARGET_DELIMITER + answer(record, completion)
    if template == "instruction":
        return alpaca_prompt(*instruction_parts(record)), answer(record, completion)
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def _turns(template: str, content: str, if_input) -> tuple[str, str, str]:
    """(a user message, the answer's opening, what comes between the opening and the answer) of
    ``template``, in a template language: ``content`` is its expression for the message's text,
    ``if_input(text)`` its text shown only when the message has an input (context)."""
    if template == "eval":  # Context: ...\nQuestion: ...\nAnswer: (model/prompts.py for a free-text item)
        return if_input("Context: {{ message['input'] }}\n") + f"Question: {content}\n", "Answer:", TARGET_DELIMITER
    if template == "instruction":
        user = ALPACA.format(if_input(ALPACA_INPUT)) + f"### Instruction:\n{content}\n\n" + if_input("### Input:\n{{ message['input'] }}\n\n")
        return user, RESPONSE, ""
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def chat_template(template: str) -> str:
    """Jinja for a tokenizer_config.json: a user message (its "content", and an optional "input":
    context) renders the training prompt of ``template``, the generation prompt opens the answer,
    and an assistant message is the answer then [EOS], so apply_chat_template(...,
    add_generation_prompt=True) gives exactly the prompt the model was fine-tuned on."""
    user, opening, before_answer = _turns(
        template, "{{ message['content'] }}", lambda text: "{% if message['input'] is defined and message['input'] %}" + text + "{% endif %}"
    )
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + user
        + "{% elif message['role'] == 'assistant' %}" + opening + before_answer + "{{ message['content'] }}{{ eos_token }}"
        + "{% else %}{{ raise_exception('this model was fine-tuned on user and assistant messages only, not ' + message['role']) }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + opening + "{% endif %}"
    )


def ollama_template(template: str, eos: str) -> str:
    """The chat template as an Ollama Modelfile's TEMPLATE (Go text/template over .Messages, as
    Ollama's own templates are written): the same text for user and assistant messages (Ollama's
    messages have no input), the answer's opening after the last user message, and ``eos`` after
    every answer but a last one, which Ollama continues."""
    user, opening, before_answer = _turns(template, "{{ .Content }}", lambda text: "")
    return (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{- if eq .Role "user" }}' + user + "{{ if $last }}" + opening + "{{ end }}"
        '{{- else if eq .Role "assistant" }}' + opening + before_answer + "{{ .Content }}{{ if not $last }}" + eos + "{{ end }}"
        "{{- end }}{{- end }}"
    )


def template_name(saved: str | None) -> str | None:
    """Which of TEMPLATES a tokenizer_config.json's chat template is (None: none of ours)."""
    return next((name for name in TEMPLATES if saved == chat_template(name)), None)


def write_chat_template(tokenizer_config: Path, template: str) -> None:
    """Put the chat template of ``template`` into a tokenizer_config.json (in place)."""
    config = json.loads(tokenizer_config.read_text())
    config["chat_template"] = chat_template(template)
    tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# -- text -> tokens ------------------------------------------------------------------------------


class Encoder(Protocol):
    """Text to ids as the model will see them at inference, and the ids that matter here."""

    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class TokenizerEncoder:
    """Our tokenizers.Tokenizer (storage.formats.load_tokenizer: special-token text stays text)."""

    def __init__(self, tokenizer, eos_id: int, pad_id: int):
        self.tokenizer, self.eos_id, self.pad_id = tokenizer, eos_id, pad_id
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


class HFEncoder:
    """A transformers tokenizer, with its own special tokens (a Llama's [BOS]) as at inference.
    Padding is masked by position, so a missing pad token borrows [EOS] harmlessly."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path} has no EOS token: fine-tuning teaches the model to stop with it; set eos_token")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[int]
    completion: list[int]  # ends in [EOS]

    @property
    def length(self) -> int:
        """Positions the example takes in a row: its tokens but the last (y is x shifted by one)."""
        return len(self.prompt) + len(self.completion) - 1

    def xy(self) -> tuple[list[int], list[int]]:
        tokens = self.prompt + self.completion
        return tokens[:-1], [IGNORE_INDEX] * (len(self.prompt) - 1) + self.completion


def encode_examples(
    records: Sequence[dict], encoder: Encoder, template: str = "eval", completion: str = "letter", max_length: int = 512
) -> tuple[list[Example], dict]:
    """Examples of every record, and a report: counts of tokens, prompts cut, examples dropped."""
    examples, mismatches, dropped, cut = [], [], [], 0
    for record in records:
        prompt_text, completion_text = render(record, template, completion)
        prompt = encoder.encode(prompt_text)
        full = encoder.encode(prompt_text + completion_text)
        if full[: len(prompt)] != prompt:
            mismatches.append((record["id"], prompt_text, completion_text))
            continue
        answer_ids = full[len(prompt):] + [encoder.eos_id]
        keep = max_length + 1 - len(answer_ids)  # x and y are max_length + 1 tokens, shifted by one
        if keep < 1:
            dropped.append(record["id"])
            continue
        cut += len(prompt) > keep
        examples.append(Example(record["id"], prompt[-keep:], answer_ids))
    if mismatches:
        first, prompt_text, completion_text = mismatches[0]
        raise ValueError(
            f"{len(mismatches)} of {len(records)} examples: the prompt's tokens are not a prefix of prompt+completion's "
            f"(a token merges across the boundary), e.g. {first}: prompt ending {prompt_text[-20:]!r}, completion "
            f"starting {completion_text[:20]!r}; end prompts on a delimiter such as 'Answer:' and start completions "
            f"with a space (template 'eval'), or use template 'instruction'"
        )
    if not examples:
        reason = f"all {len(dropped)} completions are longer than max_length {max_length}; raise max_length" if dropped else "no records given"
        raise ValueError(f"no training examples: {reason}")
    report = {
        "examples": len(examples),
        "prompt_tokens": sum(len(e.prompt) for e in examples),
        "completion_tokens": sum(len(e.completion) for e in examples),
        "prompts_cut": cut,
        "dropped_too_long": len(dropped),
        "prefix_mismatches": 0,
    }
    return examples, report


# -- tokens -> batches -----------------------------------------------------------------------------


class AllMaskedBatch(ValueError):
    """A micro-batch with no target token: training on it would silently do nothing."""


def collate(rows: Sequence[Sequence[Example]], pad_id: int, packed: bool, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, y, model inputs) of rows of examples, each row padded at its end to the longest row.
    Packed rows get ``segments``: example i of a row is segment i, its padding one more."""
    width = max(sum(e.length for e in row) for row in rows)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i, example in enumerate(row):
            xs, ys = example.xy()
            x[r, at : at + len(xs)], y[r, at : at + len(ys)], segments[r, at : at + len(xs)] = xs, ys, i
            at += len(xs)
        segments[r, at:] = len(row)
    if not (y != IGNORE_INDEX).any():
        raise AllMaskedBatch(
            f"a micro-batch of {len(rows)} rows ({', '.join(e.id for row in rows for e in row)[:200]}) has no completion "
            f"token to learn: every target is masked; check that completions are not empty"
        )
    device = torch.device(device)
    inputs = {"segments": torch.from_numpy(segments).to(device)} if packed else {}
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), inputs


def pack(examples: Sequence[Example], order: Iterable[int], max_length: int) -> list[list[int]]:
    """Rows of example indices, each row's examples taking at most max_length positions: every
    example, in ``order``, goes to the fullest row it still fits in (best fit), else a new row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        need = examples[i].length
        if need > max_length:
            raise ValueError(f"example {examples[i].id} takes {need} positions, more than max_length {max_length}")
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - need, len(rows) - 1))
            continue
        room, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (room - need, row))
    return rows


class SFTBatches:
    """The micro-batches of each optimizer step; see the module docstring. State: {"seed", "step"}."""

    weigh_by_targets = True  # completions differ in length (model/train.py target_shares)

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        packing: bool = False,
        max_length: int = 512,
        pad_id: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed, self.step = seed, 0
        self.packing, self.max_length, self.pad_id = packing, max_length, pad_id
        self.device, self.rank, self.world_size = device, rank, world_size
        self._epochs: list[list[list[int]]] = []  # rows of each epoch so far (packing changes their number)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self._epochs = []

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The rows of an epoch: the examples in the epoch's permutation, one per row or packed."""
        while len(self._epochs) <= epoch:
            order = np.random.default_rng([self.seed, len(self._epochs)]).permutation(len(self.examples)).tolist()
            self._epochs.append(pack(self.examples, order, self.max_length) if self.packing else [[i] for i in order])
        return self._epochs[epoch]

    def step_rows(self, step: int) -> list[list[int]]:
        """This rank's rows of optimizer step ``step``, micro-batch after micro-batch, from the stream of epochs."""
        per_step = self.batch_size * self.grad_accum * self.world_size
        first = step * per_step + self.rank * self.batch_size * self.grad_accum
        wanted, rows, epoch, offset = self.batch_size * self.grad_accum, [], 0, first
        while len(rows) < wanted:
            epoch_rows = self.epoch_rows(epoch)
            if offset >= len(epoch_rows):
                offset -= len(epoch_rows)
                epoch += 1
                continue
            rows += epoch_rows[offset : offset + wanted - len(rows)]
            offset, epoch = 0, epoch + 1
        return rows

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        rows = self.step_rows(self.step)
        self.step += 1
        micro = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        return [collate([[self.examples[i] for i in row] for row in batch], self.pad_id, self.packing, self.device) for batch in micro]


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int, device) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Fixed padded batches of ``examples`` in order, for the validation loss."""
    return [collate([[e] for e in examples[i : i + batch_size]], pad_id, False, device) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def completion_loss(model: torch.nn.Module, batches, autocast) -> float:
    """Mean loss over every completion token of the batches (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y, inputs in batches:
        with autocast():
            _, loss = model(x, y, **inputs)
        n = int((y != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / count
