"""`loraflow run` against a Prefect server: submit the `retrain` deployment, so the run lands on the
work pools' workers (the point of `make up`), print its URL, and follow its state and logs (its own
and its training subflow's) until it ends. The exit code is 0 only for a Completed run."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from loraflow.errors import ConfigError, LoraflowError

POLL_S = 2.0


def deployment_parameters(config, overrides: list[str], deployment_parameters: dict[str, Any]) -> dict[str, Any]:
    """The run's `settings` parameter: its whole spec, resolved here, once (loraflow.run_spec).

    Without --config: the deployment's own settings, this shell's LORAFLOW_* for what they leave
    out, and --set on top. With --config: that file's settings (with this shell's LORAFLOW_* and
    --set), keeping the deployment's routing of training (`prefect.train_deployment`, e.g. to the
    gpu pool) unless the file sets one.

    The storage location is sent whole, or not at all: when this shell names an endpoint, the
    endpoint, bucket and prefix it resolved go with the run; when it names none, the run carries no
    location and the workers' environment supplies all of it. A bucket or prefix without an
    endpoint would mix two locations, so it is refused here, in one line."""
    from loraflow.settings import load_settings

    own = deployment_parameters.get("settings") or {}
    if config is None:
        spec = load_settings(overrides=overrides, **{k: v for k, v in own.items() if isinstance(v, dict)})
    else:
        spec = load_settings(config, overrides)
        routing = (own.get("prefect") or {}).get("train_deployment")
        if "train_deployment" not in spec.prefect.model_fields_set and routing:
            spec.prefect.train_deployment = routing
    data = spec.model_dump(mode="json")
    storage = spec.storage
    if storage.endpoint_url == "local":
        raise ConfigError("storage.endpoint_url=local: the workers never publish to a machine-local store; name the "
                          "store they share (an S3 endpoint URL, or `aws`), or leave the location to their environment")
    if storage.endpoint_url is None:
        named = [f for f in ("bucket", "prefix", "region", "profile") if f in storage.model_fields_set
                 and getattr(storage, f) != type(storage).model_fields[f].default]
        if named:
            raise ConfigError(f"storage.{named[0]} is set but storage.endpoint_url is not: a run's storage location is "
                              "one unit; give storage.endpoint_url too, or leave the whole location to the workers")
        del data["storage"]
    return {"settings": data}


def submit_and_follow(config, overrides: list[str], deployment: str, *, as_json: bool = False) -> int:
    return asyncio.run(_submit_and_follow(config, overrides, deployment, as_json))


async def _submit_and_follow(config, overrides: list[str], deployment_name: str, as_json: bool) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            raise ConfigError(f"--deployment {deployment_name}: no such deployment on {client.api_url} "
                              "(apply deployments/prefect.yaml, e.g. `make up`)") from None
        except Exception as exc:  # noqa: BLE001 - httpx/connection errors of many kinds
            raise LoraflowError(f"cannot reach the Prefect server at {client.api_url}: {type(exc).__name__}") from None
        run = await client.create_flow_run_from_deployment(
            deployment.id, parameters=deployment_parameters(config, overrides, deployment.parameters or {}))
        ui = get_current_settings().ui_url
        print(f"submitted {deployment_name}: flow run {run.name!r}", flush=True)
        if ui:
            print(f"  {ui.rstrip('/')}/runs/flow-run/{run.id}", flush=True)
        seen: set = set()
        while True:
            current = await client.read_flow_run(run.id)
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            ids = [run.id, *[c.id for c in children]]
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                          sort=LogSort.TIMESTAMP_ASC)
            for line in logs:
                if line.id not in seen:
                    seen.add(line.id)
                    stamp = line.timestamp.astimezone().strftime("%H:%M:%S")
                    print(f"{stamp} {line.name}: {line.message}", file=sys.stderr, flush=True)
            state = current.state
            if state is not None and state.is_final():
                break
            await asyncio.sleep(POLL_S)
        verdict = f"flow run {run.name!r} ended {state.name}" + (f": {state.message}" if state.message else "")
        if as_json:
            print(json.dumps({"flow_run_id": str(run.id), "state": state.name, "message": state.message}))
        else:
            print(verdict)
        return 0 if state.is_completed() else 1
