"""Prompt pieces the harness has no task for: MedQA with five options, and option-text choices."""

LETTERS = "ABCDE"


def endings(doc) -> list[str]:
    """MedQA's options in order (ending0, ending1, ...): the choices of the cloze variants."""
    return [doc[f"ending{i}"] for i in range(len(LETTERS)) if f"ending{i}" in doc]


def medqa_doc_to_text(doc) -> str:
    """lm_eval/tasks/medqa/preprocess_medqa.py's template for any number of options."""
    answers = "".join(f"{k}. {v}\n" for k, v in zip(LETTERS, endings(doc)))
    return f"Question: {doc['sent1']}\n{answers}Answer:"


def medmcqa_options(doc) -> list[str]:
    return [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
