"""The `retrain-fleet` flow: many adapters (a fleet file, loraflow.fleet; docs/fleet.md) in one run.

    change check, one mapped task per adapter  ──►  unchanged: skipped (no slot, no GPU)
                                               ──►  changed: one branch each (.submit), holding one of
                                                    the fleet's slots: the `retrain` flow itself, as a
                                                    subflow of the branch's task run
    ──► one table artifact (adapter, result, metrics, verdict, version) and a Completed or Failed
        state whose message counts trained, skipped and failed

Each branch is the one-adapter `retrain` flow, not a copy of it: its adapter slot, its own change
check inside that slot (a branch that waited behind another retrain of its adapter ends Skipped),
training on the gpu pool with dead-worker resubmission and resume from stored checkpoints, the
gate, the publish, the champion's CAS move and its history, the events, the artifacts keyed by
adapter name, and the removal of its checkpoints once published: everything a single retrain does
holds per adapter, and `loraflow gc NAME` cleans each adapter as before.

How many branches run at once is Prefect's to enforce, at two levels: the fleet's global
concurrency limit `loraflow-fleet-<fleet>` (`max_parallel` in the file; created on first use) and,
for training, the gpu work pool's own concurrency limit. A branch that fails (a source that cannot
be read, a diverged run, a worker that never came back) fails its own task run; the others run to
their end. The run is Failed when any adapter failed, so a flow-run-failed automation notices.

Why in-process subflows rather than a `retrain` deployment run per adapter: the branch then is the
same flow with the same run key rules, the cpu pool runs one process for the whole fleet instead
of one per adapter (a process costs tens of seconds of imports on a small worker), and the heavy
part, training, goes to the gpu pool either way (`prefect.train_deployment`)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from loraflow.flows._common import library_logs_in_prefect
from loraflow.flows.concurrency import ensure_named_limit, held
from loraflow.flows.retrain import artifact_key, retrain
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from loraflow.errors import ConfigError
from loraflow.fleet import load_fleet
from loraflow.run_spec import for_flow_run
from loraflow.settings import Settings
from loraflow.tasks.change import change_check_task

DEFAULT_FLEET = "deployments/fleet.example.yaml"
# Training in this process (no prefect.train_deployment) touches process-wide state (torch's RNG
# seeds, accelerate's state): such branches train one at a time; the gpu pool has no such limit.
_in_process_training = threading.Lock()


def _error_text(state: Any) -> str:
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ConfigError) else str(exc)
    else:
        text = state.message or state.type.value
    return " ".join(text.split())[:500]


def _row(adapter: str, result: str, *, metrics: str = "-", verdict: str = "-", version: str | None = None,
         **extra: Any) -> dict[str, Any]:
    return {"adapter": adapter, "result": result, "metrics": metrics, "verdict": verdict, "version": version or "-",
            **extra}


def _trained_row(adapter: str, out: dict[str, Any]) -> dict[str, Any]:
    if out.get("skipped"):  # its own change check, inside the adapter's slot, found the champion current
        return _row(adapter, "skipped", verdict=out["message"], version=out.get("champion"))
    m = out.get("metrics") or {}
    metrics = (f"adapter ppl {m['adapter_ppl']:.4f}, base ppl {m['base_ppl']:.4f}"
               if m.get("adapter_ppl") is not None and m.get("base_ppl") is not None else "-")
    verdict = ("promoted" if out["promoted"] else "not promoted") + f": {out['reason']}"
    return _row(adapter, "trained", metrics=metrics, verdict=verdict, version=out["version"], promoted=out["promoted"],
                flow_run_id=out.get("flow_run_id"))


@task(name="retrain-branch", task_run_name="retrain-{settings.registry.adapter_name}", cache_policy=NO_CACHE)
def retrain_branch(settings: Settings, fleet_limit: str, fleet_name: str) -> dict[str, Any]:
    """One changed adapter: the `retrain` flow as a subflow of this task run, holding a fleet slot."""
    adapter = settings.registry.adapter_name
    one = retrain.with_options(flow_run_name=f"{fleet_name}-{adapter}")
    with held(fleet_limit, f"other adapters of fleet {fleet_name}"):
        if settings.prefect.train_deployment:
            return one(settings)
        with _in_process_training:
            return one(settings)


# The mapped change checks: I/O on one cached boto3 client per storage location, whose connection
# pool holds 10; more threads than that only queue for connections (and urllib3 warns on each).
@flow(name="retrain-fleet", task_runner=ThreadPoolTaskRunner(max_workers=8))
def retrain_fleet(fleet: str = DEFAULT_FLEET, adapters: list[str] | None = None, force: bool = False) -> Any:
    """Retrain the adapters of a fleet file whose data, base model or settings changed since their
    champion. `fleet`: the file, a path on the worker (relative to the directory the deployment was
    applied from) or absolute; `adapters`: a subset by name (empty: all); `force`: retrain them even
    when nothing changed."""
    with library_logs_in_prefect():
        return _retrain_fleet(fleet, adapters or [], force)


def _retrain_fleet(path: str, names: list[str], force: bool) -> Any:
    logger = get_run_logger()
    started = time.perf_counter()
    definition = load_fleet(path)
    chosen = definition.select(names)
    limit = ensure_named_limit(definition.limit_name, definition.max_parallel,
                               f"{definition.max_parallel} adapter(s) of fleet {definition.name} retraining at once")
    logger.info("fleet %s (%s): %d of %d adapters; at most %d retraining at once (concurrency limit %s)",
                definition.name, path, len(chosen), len(definition.specs), definition.max_parallel, limit)

    rows: dict[str, dict[str, Any]] = {}
    specs: dict[str, Settings] = {}
    # The storage location, as for any run (a worker's, when the file leaves it out): resolved once
    # per distinct location, so a worker's warning about its LORAFLOW_* variables is one line, not one per adapter.
    locations: dict[str, Any] = {}
    for name, spec in chosen.items():
        key = json.dumps([spec.storage.model_dump(mode="json"), sorted(spec.storage.model_fields_set)])
        if key not in locations:
            try:
                locations[key] = for_flow_run(spec).storage
            except ConfigError as exc:
                locations[key] = exc
        if isinstance(locations[key], ConfigError):
            rows[name] = _row(name, "failed", verdict=str(locations[key]))
            continue
        spec = spec.model_copy(update={"storage": locations[key]})
        if force:
            spec = spec.model_copy(update={"registry": spec.registry.model_copy(update={"force": True})})
        specs[name] = spec

    t = time.perf_counter()
    checks = change_check_task.map(list(specs.values()))
    checks.wait()
    check_s = time.perf_counter() - t
    changed: list[str] = []
    for name, future in zip(specs, checks):
        state = future.state
        if not state.is_completed():
            rows[name] = _row(name, "failed", verdict=f"change check: {_error_text(state)}")
            continue
        check = state.result()
        if check["unchanged"] and not force:
            rows[name] = _row(name, "skipped", verdict="unchanged since its champion", version=check["champion"])
        else:
            changed.append(name)
            logger.info("%s: %s", name, "forced" if check["unchanged"] else "; ".join(check["changed"]))
    logger.info("change check of %d adapters: %.1f s; %d changed%s", len(specs), check_s, len(changed),
                f" ({', '.join(changed)})" if changed else "")

    # A thread per changed adapter: a branch holds its thread while its training runs on the gpu pool,
    # and how many run at once is the fleet's concurrency limit's to say, not this pool's size.
    with ThreadPoolTaskRunner(max_workers=max(1, len(changed))) as runner:
        branches = {name: runner.submit(retrain_branch, {"settings": specs[name], "fleet_limit": limit,
                                                         "fleet_name": definition.name}) for name in changed}
        for name, future in branches.items():
            future.wait()
            state = future.state
            if state.is_completed():
                rows[name] = _trained_row(name, state.result())
            else:
                rows[name] = _row(name, "failed", verdict=_error_text(state))
                logger.error("%s failed: %s", name, rows[name]["verdict"])

    ordered = [rows[name] for name in chosen]
    counts = {result: sum(r["result"] == result for r in ordered) for result in ("trained", "skipped", "failed")}
    message = f"{counts['trained']} trained, {counts['skipped']} skipped, {counts['failed']} failed"
    if counts["failed"]:
        message += " (" + ", ".join(r["adapter"] for r in ordered if r["result"] == "failed") + ")"
    create_table_artifact(key=artifact_key(f"fleet-{definition.name}", "summary"),
                          table=[{k: r[k] for k in ("adapter", "result", "metrics", "verdict", "version")} for r in ordered],
                          description=f"fleet {definition.name}: {message}")
    summary = {"fleet": definition.name, "message": message, "counts": counts, "adapters": ordered,
               "timings": {"change check": check_s, "flow total": time.perf_counter() - started}}
    logger.info("fleet %s: %s in %.0f s", definition.name, message, summary["timings"]["flow total"])
    return Failed(message=message, data=summary) if counts["failed"] else Completed(message=message, data=summary)
