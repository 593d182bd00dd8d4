"""QA records rendered as lm-evaluation-harness 0.4.13 renders them, for scoring and fine-tuning.

A record is the canonical QA dict (``id``, ``source``, ``split``, ``question``, ``context``,
``options``, ``answer_idx``, ``answer_text``, ``explanation``, ``meta``). The harness's three
medical tasks, which these functions reproduce character for character:

    medqa_4options  Question: {q}\\nA. {o0}\\nB. {o1}\\nC. {o2}\\nD. {o3}\\nAnswer:      choices A B C D
    medmcqa         Question: {q}\\nChoices:\\nA. {o0}\\n...\\nD. {o3}\\nAnswer:          choices A B C D
    pubmedqa        Abstract: {contexts joined by \\n}\\nQuestion: {q}\\nAnswer:         choices yes no maybe

MedQA with five options uses the MedQA template with letters A-E (the harness has no such task).
Each choice is scored as the continuation TARGET_DELIMITER + choice. Two choice styles:

- "letters": the harness's choices for MedQA/MedMCQA (" A", " B", ...).
- "cloze": the option text itself (" Aspirin"); small models do badly on letters, so both are
  reported, labelled. PubMedQA's harness choices already are the answer words: its only style is
  "cloze".

Fine-tuning renders the same prompt and uses ``target(record, style)`` (" A", " yes") as the
completion. The explanation (PubMedQA's LONG_ANSWER) never goes into a prompt: it is the answer
itself (BioGPT's 78.2% put it in the input).
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from tasks.qa.records import Prompting

TARGET_DELIMITER = " "  # between a prompt and its answer (the harness's default)
FEWSHOT_DELIMITER = "\n\n"  # after each worked example (the harness's default)
LETTERS = "ABCDEFGHIJ"
STYLES = ("letters", "cloze")


def prompting(record: dict) -> Prompting:
    """How the dataset whose records have ``record``'s source is prompted (its ``Dataset``:
    tasks/qa/registry.py); a record of no registered dataset (instruction data, a renamed source)
    has the plain prompt."""
    from tasks.qa.records import PLAIN  # tasks/qa declares the datasets; imported when first needed, so model/ loads without it
    from tasks.qa.registry import BY_NAME

    dataset = BY_NAME.get(record["source"])
    return dataset.prompting if dataset else PLAIN


def doc_to_text(record: dict) -> str:
    """The prompt for one record, ending in "Answer:" (no trailing space: the answer brings it)."""
    how = prompting(record)
    lines = []
    if record["context"]:
        lines.append(how.context_label + "\n".join(record["context"]))
    lines.append("Question: " + record["question"])
    options = option_lines(record)
    if options and how.options_heading:
        lines.append(how.options_heading)
    lines += options
    return "\n".join(lines) + "\nAnswer:"


def option_lines(record: dict) -> list[str]:
    """The lettered options as a prompt lists them ("A. Aspirin", ...); none where the options are
    the answer words (PubMedQA's yes/no/maybe), never listed, and none for free-text items."""
    options = record["options"]
    if not options or prompting(record).answer_words:
        return []
    if len(options) > len(LETTERS):
        raise ValueError(f"record {record['id']}: {len(options)} options; at most {len(LETTERS)} have letters")
    return [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]


def choices(record: dict, style: str) -> list[str]:
    """The answer strings scored for a record, without the target delimiter, in option order."""
    options = record["options"]
    if not options:
        raise ValueError(f"record {record['id']} has no options; it is a free-text item, not multiple choice")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style == "letters" and prompting(record).answer_words:
        raise ValueError(f"record {record['id']}: its options are the answer words ({', '.join(options)}), without letters: use style='cloze'")
    return list(LETTERS[: len(options)]) if style == "letters" else list(options)


def gold_index(record: dict) -> int:
    idx = record["answer_idx"]
    if idx is None or not 0 <= idx < len(record["options"]):
        raise ValueError(f"record {record['id']}: answer_idx {idx!r} does not index its {len(record['options'])} options")
    return idx


def target(record: dict, style: str) -> str:
    """The gold continuation, delimiter included: " A" (letters) or " yes" / " Aspirin" (cloze)."""
    return TARGET_DELIMITER + choices(record, style)[gold_index(record)]


def fewshot_context(record: dict, shots: Sequence[dict], style: str) -> str:
    """Worked examples then the record's prompt, as the harness joins them for plain-text models:
    each shot is prompt + " " + gold choice + "\\n\\n"; the record's prompt follows, unanswered."""
    examples = "".join(doc_to_text(s) + target(s, style) + FEWSHOT_DELIMITER for s in shots)
    return examples + doc_to_text(record)


def _seed(item_id: str) -> int:
    """A seed from the item id alone (Python's str hash changes from run to run)."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "little")


def select_shots(record: dict, pool: Sequence[dict], k: int) -> tuple[list[dict], str]:
    """k worked examples for ``record`` from ``pool`` and where they came from.

    Shots come from a split other than the record's; when the pool holds fewer than k of those,
    they come from the record's own split, and the returned label says so. Never the record
    itself (same id or same question). The draw depends only on the record's id and on the
    pool's content (sorted by id), not on the order it is given in.
    """
    if k == 0:
        return [], "none"

    def usable(r: dict) -> bool:
        return r["id"] != record["id"] and r["question"] != record["question"]

    others = sorted((r for r in pool if r["split"] != record["split"] and usable(r)), key=lambda r: r["id"])
    if len(others) >= k:
        splits = sorted({r["split"] for r in others})
        return random.Random(_seed(record["id"])).sample(others, k), "other split: " + ", ".join(splits)
    same = sorted((r for r in pool if r["split"] == record["split"] and usable(r)), key=lambda r: r["id"])
    if len(same) < k:
        raise ValueError(
            f"{k} shots asked for item {record['id']}, but the pool has only {len(others)} items of other splits "
            f"and {len(same)} other items of its split {record['split']!r}; lower num_fewshot or pass more records"
        )
    label = f"same split ({record['split']}): other splits have {len(others)} items, fewer than {k}"
    return random.Random(_seed(record["id"])).sample(same, k), label


def reference(record: dict) -> str:
    """The free-text answer a generation is compared with: the explanation where the dataset's long
    answers are its free-text set (PubMedQA's LONG_ANSWER), else answer_text."""
    text = record["explanation"] if prompting(record).long_answers else record["answer_text"]
    if not text:
        raise ValueError(f"record {record['id']} has no reference answer (explanation/answer_text is empty)")
    return text
