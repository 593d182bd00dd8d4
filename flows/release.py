"""release: an evaluated model packaged for people: transformers folder, GGUF, model card, lineage.

    medlm release                                   # the newest evaluation's model
    medlm release --evaluation-ref evaluate/KEY --name medlm-base
    medlm release push USER/REPO                    # upload the newest release to the Hub
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.stage import publish_lineage, publish_result, run_stage
from storage import Store
from storage.formats import MODEL_KINDS
from tasks.release import CARD_FILE, RELEASE, ReleaseConfig


@flow(name="release")
def release(
    *,
    release: ReleaseConfig = ReleaseConfig(),
    evaluation_ref: Annotated[str | None, Field(description="The evaluation whose model to release, e.g. evaluate/3f9a... (unset: the newest evaluation).")] = None,
) -> str:
    """Package the model an evaluation scored, with that evaluation in its card; returns the release's ref."""
    store = Store()
    evaluation = store.require(evaluation_ref) if evaluation_ref else store.newest("evaluate")
    model = next(store.require(p) for p in evaluation.parents if p.split("/")[0] in MODEL_KINDS)
    result = run_stage(RELEASE, {"model": model, "evaluation": evaluation}, release)
    create_markdown_artifact(key="model-card", markdown=result.file(CARD_FILE).read_text(), description=f"{result.ref}: the model card of {model.ref}")
    publish_lineage(result.ref)
    get_run_logger().info("release %s: %s", result.ref, result.summary)
    return publish_result(result.ref)
