"""What a worker of ours runs for a flow run (the work pools' job template names it; a caller cannot
change it): Prefect's engine, on one of medlm's own flows, loaded from this worker's copy of the
repository.

    python -m deployments.engine      (PREFECT__FLOW_RUN_ID set by the worker)

Prefect's own engine loads a run's flow as its deployment says: the deployment's entrypoint, after
its pull steps (which may run any command). Anyone who can edit a deployment through the API could
make a worker run anything that way. Here the deployment only names which flow of the registry
(flows/registry.py) to run: a run of any other deployment fails with the reason, and no pull step
runs; so does a run this worker would build with other stage versions than the deployments were
registered with (deployments/code.py). The flow runs in the repository's folder, as the registered
deployments' pull step had it.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from uuid import UUID

from deployments import code
from flows.registry import DEPLOYMENTS, FlowEntry, current_name

REPO = Path(__file__).resolve().parents[1]


class Refused(Exception):
    """The flow run is not one this worker runs; the message says why."""


def our_flow(deployment) -> FlowEntry:
    """The registry's entry for a deployment, if it is one of ours as registered (deployments/deploy.py),
    under its name or a name it had (flows/registry.py ALIASES: a stack registered before a rename)."""
    entrypoint = current_name("deployment", deployment.entrypoint) if deployment is not None else None
    entry = next((d for d in DEPLOYMENTS if d.entrypoint == entrypoint), None)
    if entry is None:
        names = ", ".join(d.entrypoint for d in DEPLOYMENTS)
        raise Refused(f"this worker runs only medlm's flows ({names}); the deployment's entrypoint is "
                      f"{getattr(deployment, 'entrypoint', None)!r}")
    return entry


def main() -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed
    from prefect.variables import Variable

    flow_run_id = UUID(sys.argv[1] if len(sys.argv) > 1 else os.environ["PREFECT__FLOW_RUN_ID"])
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        try:
            deployment = client.read_deployment(flow_run.deployment_id) if flow_run.deployment_id else None
            entry = our_flow(deployment)
            registered = Variable.get(code.VARIABLE)
            if registered is not None and (why := code.differences(registered, code.record())):
                raise Refused(why)
        except Refused as refused:
            client.set_flow_run_state(flow_run_id, Failed(message=f"refused by the worker: {refused}"), force=True)
            raise SystemExit(f"refused flow run {flow_run_id}: {refused}") from None
    os.chdir(REPO)
    os.environ["PREFECT__FLOW_ENTRYPOINT"] = str(REPO / entry.entrypoint)  # Prefect's engine then loads it as given, no pull steps
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
