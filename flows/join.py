"""join: this machine joins a multi-node training run that another machine's stage announced.

The Prefect side of `medlm join` (model/distributed.py): deployed as `join/join` on the gpu pool,
so a multi-node run can start from the UI: a `pretrain` (or `finetune`) run with run.nodes = N,
rdzv_endpoint and rdzv_id, and N - 1 `join` runs with that rdzv_id. Prefect places each run on
whichever worker takes it first and starts none together (it has no gang scheduling): with one
gpu worker per machine, each started with `--limit 1`, N runs created at once land on N machines.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from model.distributed import join as join_launch


@flow(name="join")
def join(
    *,
    rdzv_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The run's rdzv_id, as its stage was given it.")],
    timeout_s: Annotated[float, Field(ge=1, le=86400, description="Seconds to wait for the stage to announce the run.")] = 600,
) -> None:
    """Wait for the announced launch ``rdzv_id`` and run this machine's part of it."""
    join_launch(rdzv_id, timeout_s, log=get_run_logger().info)
