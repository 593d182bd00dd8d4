"""Chat with a fine-tuned model: each turn rendered by the chat template it was fine-tuned with
(its tokenizer_config.json), the answer streamed as it is generated, with a key/value cache.

    medlm chat finetune/KEY                          # a conversation on the terminal
    medlm chat finetune/KEY --message "Is aspirin an anticoagulant?"
    python -m model.chat FOLDER [--message TEXT]     # a model folder, no store

The model's context holds the prompt and the answer. The prompt is kept whole, and the answer
gets ``max_tokens`` or what the context leaves after the prompt, if less (a note says so). The
prompt may take at most three quarters of the context, so an answer always has room for a
quarter of it (or ``max_tokens`` if fewer): earlier turns of a conversation are left out, oldest
first, to stay within that, and a message too long for it alone is cut at a token boundary, a
note saying how much was dropped. Notes go to ``notify`` (the command: stderr).

An answer is kept in the conversation as the template renders an assistant message: without the
text the template puts between its generation prompt and the answer (the eval template's space
after "Answer:", which the model generates itself), so the next turn's prompt holds the first
answer exactly as the model wrote it.

The disclaimer is shown to the user, not given to the model: the templates fine-tuning writes
have user and assistant messages only (model/sft.py ``chat_template``), so a system message
would be a prompt the model never saw in training.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from model.scoring import load_causal_lm
from storage.config import ArgumentParser

DISCLAIMER = (
    "medlm is a research language model trained on PubMed abstracts and medical exam questions. It is not a "
    "medical device and does not give medical advice: its answers can be wrong, incomplete or out of date. "
    "Ask a qualified health professional about any medical question."
)
MARK = "\x00answer\x00"  # stands for an answer's text when the template's lead before it is measured


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Chat:
    """A conversation with the model in ``folder`` (our checkpoint or a Hugging Face folder with a chat template)."""

    def __init__(self, folder: str | Path, max_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
                 notify: Callable[[str], None] = to_stderr):
        from transformers import AutoTokenizer

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not temperature >= 0 or math.isinf(temperature):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        self.template = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not self.template.chat_template:
            raise ValueError(f"{folder} has no chat template in tokenizer_config.json; chat with a finetune artifact (fine-tuning writes the template it trained with)")
        self.lm = load_causal_lm(folder)
        self.max_tokens, self.temperature, self.top_p, self.notify = max_tokens, temperature, top_p, notify
        self.context = self.lm.max_length
        self.prompt_at_most = self.context - min(max_tokens, self.context // 4)
        self.generator = torch.Generator(device=self.lm.device).manual_seed(seed)
        self.messages: list[dict] = []
        asked = [{"role": "user", "content": "?"}]
        opening = self.render(asked)
        answered = self.template.apply_chat_template([*asked, {"role": "assistant", "content": MARK}], tokenize=False)
        at = answered.find(MARK, len(opening))
        self.lead = answered[len(opening) : at] if answered.startswith(opening) and at >= 0 else ""

    def render(self, messages: list[dict]) -> str:
        return self.template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokens(self, prompt: str) -> int:
        return len(self.lm.encode(prompt))

    def prompt(self, text: str) -> tuple[str, str]:
        """The message as the model will read it (cut if it must be) and the prompt for it: the
        latest earlier turns that fit with it, each left-out turn and cut token said."""
        if not text.strip():
            raise ValueError("the message is empty: ask something (in a conversation, an empty line ends it)")
        earlier = self.messages
        while earlier and self.tokens(self.render([*earlier, {"role": "user", "content": text}])) > self.prompt_at_most:
            earlier = earlier[2:]  # a user message and its answer
        if left_out := (len(self.messages) - len(earlier)) // 2:
            self.notify(f"note: {left_out} earlier turn(s) left out of the model's {self.context}-token context, to leave room for this message and an answer ({len(earlier) // 2} kept)")
        prompt = self.render([*earlier, {"role": "user", "content": text}])
        if self.tokens(prompt) > self.prompt_at_most:
            text = self.cut(text)
            prompt = self.render([{"role": "user", "content": text}])
        return text, prompt

    def cut(self, text: str) -> str:
        """The longest run of ``text``'s first tokens whose prompt fits, the rest dropped, said."""
        ids = self.lm.encode(text, add_special_tokens=False)

        def head(n: int) -> str:
            while n and self.lm.decode(ids[:n]).endswith("\ufffd"):  # not inside a character's bytes
                n -= 1
            return self.lm.decode(ids[:n])

        low, high = 0, len(ids)  # head(low) fits; find the largest that does
        while low < high:
            mid = (low + high + 1) // 2
            if self.tokens(self.render([{"role": "user", "content": head(mid)}])) <= self.prompt_at_most:
                low = mid
            else:
                high = mid - 1
        kept = head(low)
        if not kept.strip():
            raise ValueError(f"the chat template leaves no room for a message in the model's {self.context}-token context")
        kept_tokens = len(self.lm.encode(kept, add_special_tokens=False))
        self.notify(f"note: the message is {len(ids):,} tokens, more than the model's {self.context}-token context holds with room for an answer: "
                    f"cut after its first {kept_tokens:,} tokens ({len(ids) - kept_tokens:,} tokens, {len(text) - len(kept):,} characters dropped)")
        return kept

    def reply(self, text: str) -> Iterator[str]:
        """The model's answer to ``text``, piece by piece; the conversation so far is its context."""
        text, prompt = self.prompt(text)
        used = self.tokens(prompt)
        room = min(self.max_tokens, self.context - used)
        if room < self.max_tokens:
            self.notify(f"note: the answer is capped at {room} tokens: the prompt takes {used} of the model's {self.context}")
        answer = []
        for piece in without_lead(self.lm.stream(prompt, room, self.temperature, self.top_p, self.generator), self.lead):
            answer.append(piece)
            yield piece
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]


def without_lead(pieces: Iterator[str], lead: str) -> Iterator[str]:
    """The text of ``pieces`` less a leading ``lead``, piece by piece (text that is not the lead passes whole)."""
    held = ""
    for piece in pieces:
        if lead:
            held += piece
            if lead.startswith(held) and len(held) < len(lead):
                continue  # it may still be the lead
            piece, lead = held.removeprefix(lead), ""
        if piece:
            yield piece


def converse(chat: Chat, message: str | None, out=sys.stdout, err=sys.stderr, read=input) -> None:
    """One answer to ``message``, or turns read from the user until an empty line or end of input."""
    print(DISCLAIMER, file=err, flush=True)
    if message is not None:
        print("".join(chat.reply(message)).strip(), file=out, flush=True)
        return
    while True:
        try:
            text = read("> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            return
        if not text:
            return
        for piece in chat.reply(text):
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)


def _number(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (``low`` excluded if ``low_open``)."""
    def parse(text: str) -> float:
        value = float(text)  # argparse words a ValueError as "invalid parse value"
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            wanted = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {wanted}")
        return value
    parse.__name__ = "number"
    return parse


def add_chat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message", help="Answer this one message and exit (without it: a conversation, ended by an empty line or Ctrl-D).")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="Tokens per answer at most; fewer when the prompt leaves less of the model's context (a note says so) [default: 256].")
    parser.add_argument("--temperature", type=_number(0.0), default=0.0, help="Sampling temperature; 0 is greedy, the same answer every time [default: 0].")
    parser.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), help="Sample from the smallest set of tokens whose probability reaches this (with --temperature > 0).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling [default: 0].")


def chat_from(folder: Path, args: argparse.Namespace) -> None:
    converse(Chat(folder, args.max_tokens, args.temperature, args.top_p, args.seed), args.message)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="A model folder with a chat template: a finetune artifact, or a Hugging Face folder.")
    add_chat_options(parser)
    args = parser.parse_args(argv)
    chat_from(args.folder, args)


if __name__ == "__main__":
    main()
