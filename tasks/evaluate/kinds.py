"""What each kind of result (multiple choice, language modelling, generation) owns: its summary,
its headline metric and how it is shown. Each kind is one object in the module that measures it
(``MULTIPLE_CHOICE``, ``LANGUAGE_MODELLING``, ``GENERATION``); ``results.KINDS`` finds it by the
``kind`` string a result stores."""

from __future__ import annotations

from typing import ClassVar


class Kind:
    name: ClassVar[str]  # the "kind" a result of this kind stores
    main_metric: ClassVar[str]  # the one number it is summed up by (release model-index, progress, comparisons)
    task_type: ClassVar[str] = "text-generation"  # the model-index task it scores (a model card's eval results)
    corpus: ClassVar[str | None] = None  # the Hugging Face dataset every result of the kind is measured on, if one

    def summarise(self, result: dict) -> dict:
        """metrics and baseline of a result from its per-item records (and its baseline rule)."""
        if not result["per_item"]:
            raise ValueError("no items to summarise")
        return self.summary(result["per_item"], result["baseline_rule"])

    def summary(self, items: list[dict], rule: dict) -> dict:
        """``summarise``'s answer from the (non-empty) items."""
        raise NotImplementedError

    def title(self, result: dict) -> str:
        """The report's table the result goes in."""
        return result["name"]

    def how(self, result: dict) -> str:
        """What tells the result from others of the same benchmark, in a row table."""
        return ""

    def setting(self, result: dict) -> str:
        """How it was measured, as the report's metric column says."""
        raise NotImplementedError

    def headline_name(self, result: dict) -> str:
        """Its name among the stage's headline numbers."""
        return f"{result['name']} {self.main_metric}"
