"""`loraflow run` against a Prefect server: submit the `retrain` deployment, so the run lands on the
work pools' workers (the point of `make up`), print its URL, and follow its state and logs (its own
and its training subflow's) until it ends. The exit code is 0 only for a Completed run."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

from loraflow.errors import ConfigError, LoraflowError

POLL_S = 2.0
DRAIN_S = 15.0  # the longest a finished run's last log lines are waited for


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


# Workers log this pair into a run's logs every time they try to start it and the server says wait
# (a full deployment slot): dozens of times while one run waits. What the run waits for is said
# once instead (see Waits), and the pairs go to DEBUG; "submitted to infrastructure" still shows
# when it starts.
WORKER_NOISE = re.compile(r"^(Aborted submission of flow run|Worker '[^']*' submitting flow run)")
# How late a Scheduled run may be before the wait is explained (workers poll every ~10 s).
LATE_S = 20.0
ACTIVE = ("PENDING", "RUNNING", "CANCELLING")
WAITED_FOR = {"deployment": "the deployment's concurrency slot", "pool": "the work pool",
              "adapter": "the adapter's retrain slot"}


def _is_noise(line) -> bool:
    return (line.name or "").startswith("prefect.flow_runs.worker") and bool(WORKER_NOISE.match(line.message))


def _since(run) -> str:
    start = run.start_time or run.expected_start_time
    return f", since {start.astimezone().strftime('%H:%M:%S')}" if start else ""


def _label(run, deployments: dict) -> str:
    deployment = deployments.get(run.deployment_id)
    where = f" ({deployment})" if deployment else ""
    return f"flow run {run.name!r}{where}, {run.state.name if run.state else '?'}{_since(run)}"


class Waits:
    """What the followed run (or its training subflow) waits for, from Prefect's API, said once per
    cause: a deployment's concurrency slot (AwaitingConcurrencySlot), a work pool with no worker or
    a full pool (Scheduled and late), the adapter's retrain slot (Running, inside the flow), with the
    run holding it when the API can tell."""

    def __init__(self, client, run_id, adapter: str | None):
        self.client, self.run_id, self.adapter = client, run_id, adapter
        self.deployments: dict = {}  # id -> "flow/deployment"
        self.said: dict[tuple, float] = {}  # cause -> monotonic time first said
        self.slot_taken = False  # the flow logged that it holds the adapter slot

    async def _deployment(self, deployment_id):
        if deployment_id is None:
            return None
        if deployment_id not in self.deployments:
            try:
                d = await self.client.read_deployment(deployment_id)
                flow = await self.client.read_flow(d.flow_id)
                self.deployments[deployment_id] = (f"{flow.name}/{d.name}", d)
            except Exception:  # noqa: BLE001 - an explanation is best effort, never a failure
                self.deployments[deployment_id] = (str(deployment_id), None)
        return self.deployments[deployment_id]

    def _names(self) -> dict:
        return {k: v[0] for k, v in self.deployments.items()}

    async def _active_runs(self, exclude, **filters) -> list:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType

        runs = await self.client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType[t] for t in ACTIVE]))), **filters)
        for r in runs:
            await self._deployment(r.deployment_id)
        return [r for r in runs if r.id != exclude]

    async def _deployment_slot(self, run) -> str:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        name, deployment = await self._deployment(run.deployment_id)
        limit = getattr(getattr(deployment, "global_concurrency_limit", None), "limit", None)
        holders = await self._active_runs(run.id, deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.deployment_id])))
        held = "; held by " + "; ".join(_label(h, self._names()) for h in holders) if holders else ""
        return (f"flow run {run.name!r} is AwaitingConcurrencySlot: deployment {name} runs "
                f"{limit if limit is not None else 'a limited number of'} at a time (its concurrency_limit){held}")

    async def _pool(self, run) -> str | None:
        from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

        name, deployment = await self._deployment(run.deployment_id)
        pool_name = getattr(deployment, "work_pool_name", None)
        if not pool_name:
            return None
        pool = await self.client.read_work_pool(pool_name)
        what = f"flow run {run.name!r} ({name}) waits for the {pool_name} pool"
        if pool.is_paused:
            return f"{what}: the pool is paused (prefect work-pool resume {pool_name})"
        workers = [w for w in await self.client.read_workers_for_work_pool(pool_name)
                   if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]
        if not workers:
            return f"{what}: no worker polls it (start one: prefect worker start --pool {pool_name})"
        busy = await self._active_runs(run.id, work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool_name])))
        if pool.concurrency_limit is not None and len(busy) >= pool.concurrency_limit:
            return (f"{what}: its concurrency limit ({pool.concurrency_limit}) is taken by "
                    + "; ".join(_label(b, self._names()) for b in busy))
        return None  # a worker will pick it up at its next poll

    async def _adapter_slot(self, run) -> str | None:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

        if self.adapter is None or self.slot_taken:
            return None
        slot = f"loraflow-retrain-{self.adapter}"
        try:
            limit = await self.client.read_global_concurrency_limit_by_name(slot)
        except Exception:  # noqa: BLE001 - missing until the first run of the adapter creates it
            return None
        if not limit.active or limit.active_slots < limit.limit:
            return None
        flow = await self.client.read_flow(run.flow_id)
        others = [r for r in await self._active_runs(run.id, flow_filter=FlowFilter(name=FlowFilterName(any_=[flow.name])))
                  if r.state and r.state.is_running() and _adapter_of(r) == self.adapter]
        if not others:
            return None  # the slot is this run's own, its log line is on the way
        return (f"flow run {run.name!r} is running and waits for concurrency slot {slot} (limit {limit.limit}, "
                f"one retrain of {self.adapter} at a time); held by " + "; ".join(_label(o, self._names()) for o in others))

    async def check(self, runs: list) -> list[str]:
        """New lines to say: a wait that started, or one that ended."""
        from prefect.types._datetime import now

        causes: dict[tuple, str] = {}
        for run in runs:
            state = run.state
            if state is None or state.is_final():
                continue
            try:
                if state.name == "AwaitingConcurrencySlot":
                    causes[(run.id, "deployment")] = await self._deployment_slot(run)
                elif state.is_scheduled() and state.state_details.scheduled_time is not None and \
                        (now("UTC") - state.state_details.scheduled_time).total_seconds() > LATE_S:
                    why = await self._pool(run)
                    if why:
                        causes[(run.id, "pool")] = why
                elif state.is_running() and run.id == self.run_id:
                    why = await self._adapter_slot(run)
                    if why:
                        causes[(run.id, "adapter")] = why
            except Exception:  # noqa: BLE001 - best effort: following the run matters more
                continue
        out = [f"waiting: {text}" for cause, text in causes.items() if cause not in self.said]
        for cause in causes:
            self.said.setdefault(cause, time.monotonic())
        for cause, since in list(self.said.items()):
            if cause not in causes and since is not None:
                out.append(f"done waiting for {WAITED_FOR[cause[1]]} after {time.monotonic() - since:.0f} s")
                self.said[cause] = None  # said once; never again for this cause
        return out


def _adapter_of(run) -> str | None:
    settings = (run.parameters or {}).get("settings") or {}
    name = (settings.get("registry") or {}).get("adapter_name") if isinstance(settings, dict) else None
    if name is None:
        from loraflow.settings import Settings

        name = Settings.model_fields["registry"].default_factory().adapter_name
    return name


async def _submit_and_follow(config, overrides: list[str], deployment_name: str, as_json: bool) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    from loraflow.log import get_logger

    log = get_logger("submit")
    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            raise ConfigError(f"--deployment {deployment_name}: no such deployment on {client.api_url} "
                              "(apply deployments/prefect.yaml, e.g. `make up`)") from None
        except Exception as exc:  # noqa: BLE001 - httpx/connection errors of many kinds
            raise LoraflowError(f"cannot reach the Prefect server at {client.api_url}: {type(exc).__name__}") from None
        parameters = deployment_parameters(config, overrides, deployment.parameters or {})
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        ui = get_current_settings().ui_url
        print(f"submitted {deployment_name}: flow run {run.name!r}", flush=True)
        if ui:
            print(f"  {ui.rstrip('/')}/runs/flow-run/{run.id}", flush=True)
        waits = Waits(client, run.id, ((parameters["settings"].get("registry") or {}).get("adapter_name")))
        seen: set = set()
        noise = 0
        # The run's own process ships its log lines in batches (Prefect's logging.to_api.batch_interval)
        # and sends the last one after it has set the final state: once the state is final, the logs
        # are read until a poll a whole batch interval later brings nothing new (at most DRAIN_S).
        ship_s = get_current_settings().logging.to_api.batch_interval
        final_at = None

        def say(text: str) -> None:
            print(f"{time.strftime('%H:%M:%S')} loraflow.submit: {text}", file=sys.stderr, flush=True)

        while True:
            current = await client.read_flow_run(run.id)
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            ids = [run.id, *[c.id for c in children]]
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                          sort=LogSort.TIMESTAMP_ASC)
            fresh = 0
            for line in logs:
                if line.id not in seen:
                    seen.add(line.id)
                    fresh += 1
                    if _is_noise(line):
                        noise += 1
                        log.debug("%s: %s", line.name, line.message)
                        continue
                    if "holding concurrency slot" in line.message:
                        waits.slot_taken = True
                    stamp = line.timestamp.astimezone().strftime("%H:%M:%S")
                    print(f"{stamp} {line.name}: {line.message}", file=sys.stderr, flush=True)
            state = current.state
            if state is not None and state.is_final():
                now = time.monotonic()
                final_at = final_at or now
                if (not fresh and now - final_at >= ship_s + POLL_S) or now - final_at > DRAIN_S:
                    break
                await asyncio.sleep(POLL_S)
                continue
            for text in await waits.check([current, *children]):
                say(text)
            await asyncio.sleep(POLL_S)
        if noise:
            log.debug("left out %d worker submission/abort lines (the run waited for a slot)", noise)
        verdict = f"flow run {run.name!r} ended {state.name}" + (f": {state.message}" if state.message else "")
        if as_json:
            print(json.dumps({"flow_run_id": str(run.id), "state": state.name, "message": state.message}))
        else:
            print(verdict)
        return 0 if state.is_completed() else 1
