"""Chat with a fine-tuned model: each turn rendered by the chat template it was fine-tuned with
(its tokenizer_config.json), the answer streamed as it is generated, with a key/value cache.

    medlm chat finetune/KEY                          # a conversation on the terminal
    medlm chat finetune/KEY --message "Is aspirin an anticoagulant?"
    python -m model.chat FOLDER [--message TEXT]     # a model folder, no store

The disclaimer is shown to the user, not given to the model: the templates fine-tuning writes
have user and assistant messages only (model/sft.py ``chat_template``), so a system message
would be a prompt the model never saw in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import torch

from model.scoring import load_causal_lm
from storage.config import ArgumentParser

DISCLAIMER = (
    "medlm is a research language model trained on PubMed abstracts and medical exam questions. It is not a "
    "medical device and does not give medical advice: its answers can be wrong, incomplete or out of date. "
    "Ask a qualified health professional about any medical question."
)
class Chat:
    """A conversation with the model in ``folder`` (our checkpoint or a Hugging Face folder with a chat template)."""

    def __init__(self, folder: str | Path, max_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None, seed: int = 0):
        from transformers import AutoTokenizer

        self.template = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not self.template.chat_template:
            raise ValueError(f"{folder} has no chat template in tokenizer_config.json; chat with a finetune artifact (fine-tuning writes the template it trained with)")
        self.lm = load_causal_lm(folder)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        self.max_tokens = min(max_tokens, self.lm.max_length - 1)  # room for at least one token of prompt
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=self.lm.device).manual_seed(seed)
        self.messages: list[dict] = []

    def reply(self, text: str) -> Iterator[str]:
        """The model's answer to ``text``, piece by piece; the conversation so far is its context
        (cut from the start when it no longer fits)."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.template.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        answer = []
        for piece in self.lm.stream(prompt, self.max_tokens, self.temperature, self.top_p, self.generator):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(answer)})


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


def add_chat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message", help="Answer this one message and exit (without it: a conversation, ended by an empty line or Ctrl-D).")
    parser.add_argument("--max-tokens", type=int, default=256, help="Tokens per answer at most [default: 256].")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 is greedy, the same answer every time [default: 0].")
    parser.add_argument("--top-p", type=float, help="Sample from the smallest set of tokens whose probability reaches this (with --temperature > 0).")
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
