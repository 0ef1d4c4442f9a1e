"""The `retrain` flow: change check -> [train-adapter: prepare data -> train -> evaluate] -> gate ->
publish -> promote. When data, base model and training settings are what the champion was trained
on (loraflow.changes), the run ends early in a Completed state named Skipped and publishes nothing.

One typed parameter, `settings` (loraflow's Settings; its defaults are the seed notebook's recipe),
so the Prefect UI renders it as a form. The gate (loraflow.promotion, docs/gate.md) scores the
candidate, the base model and the current champion on the same eval documents and moves the
`champion` alias only when a paired bootstrap says the candidate beats the base and the champion
with confidence and its generation health has not regressed; its verdict and intervals go into the
version's manifest, so the gate runs before the publish. Otherwise the version is published but
not promoted, and the run says so in its logs, artifacts and a `loraflow.adapter.promotion-refused`
event. A diverged training run or a failed evaluation stops the flow before anything is published."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any

from loraflow.flows._common import current_run_key, library_logs_in_prefect, run_logger, seed_settings
from loraflow.flows.concurrency import adapter_slot
from loraflow.flows.train_adapter import train_adapter_flow
from prefect import flow
from prefect.states import Completed
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from loraflow import events
from loraflow.errors import LoraflowError, TrainingError
from loraflow.promotion import GateDecision, decide
from loraflow.run_spec import for_flow_run
from loraflow.settings import Settings
from loraflow.tasks.change import change_check_task
from loraflow.tasks.promote import promote_task
from loraflow.tasks.publish import publish_task
from loraflow.tasks.train import fetch_staged_task, remove_run_scratch


def artifact_key(name: str, what: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


def train_remote(settings: Settings, run_key: str) -> dict[str, Any]:
    """Run the train-adapter flow as a flow run of its deployment (e.g. on the GPU pool) and fetch
    the adapter and results it staged in object storage.

    A worker that dies (killed, lost its machine) leaves its run Running with no heartbeat; after
    `prefect.heartbeat_timeout_s` without one the run is marked Crashed and submitted again with the
    same run key, so the new attempt resumes from the newest verified checkpoint in storage. At
    most `prefect.train_attempts` submissions."""
    from loraflow.flows._common import submit_and_watch

    deployment = settings.prefect.train_deployment
    logger = run_logger()
    # The whole spec, storage location included (settings hold no secrets): the training worker
    # follows it and takes only credentials from its own machine.
    parameters = {"settings": settings.model_dump(mode="json"), "run_key": run_key}
    attempts = settings.prefect.train_attempts
    for attempt in range(1, attempts + 1):
        child, state, lost = submit_and_watch(deployment, parameters, settings.prefect.heartbeat_timeout_s)
        if state is not None and state.is_completed():
            return fetch_staged_task(settings, run_key)
        described = f"training run {child.name!r} of deployment {deployment!r} ended " \
                    f"{state.type.value if state else 'unknown'}: {state.message if state else ''}"
        if not lost or attempt == attempts:
            raise TrainingError(described if not lost else f"{described} (attempt {attempt} of {attempts})")
        logger.warning("%s; submitting it again with run key %s (attempt %d of %d), resuming from its newest "
                       "stored checkpoint", described, run_key, attempt + 1, attempts)
    raise AssertionError("unreachable")


def skipped(settings: Settings, check: dict[str, Any], elapsed: float) -> Any:
    """A Completed state named Skipped: nothing changed since the champion was trained."""
    name = settings.registry.adapter_name
    message = f"skipped: nothing changed since {name}=={check['champion']}"
    run_logger().info("%s (data, base model and training settings as recorded in its manifest; "
                          "--force or registry.force retrains anyway)", message)
    create_markdown_artifact(key=artifact_key(name, "version"), markdown=f"# {name}: {message}\n",
                             description=message)
    return Completed(name="Skipped", message=message,
                     data={"skipped": True, "message": message, "name": name, "champion": check["champion"],
                           "timings": {"change check": elapsed}})


def gate(settings: Settings, evaluation: dict[str, Any], champion: dict[str, Any]) -> GateDecision:
    registry = settings.registry
    return decide(evaluation, champion["evaluation"], champion_version=champion["version"],
                  margin=registry.promotion_margin, resamples=registry.gate_resamples,
                  confidence=registry.gate_confidence, eos_tolerance=registry.health_eos_tolerance,
                  distinct_tolerance=registry.health_distinct_tolerance)


def _loss_curve_markdown(path: str | None) -> str:
    if not path or not Path(path).is_file():
        return "_no loss curve was recorded_"
    # The UI renders markdown images; a data: URI needs no web server for the PNG.
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![training loss](data:image/png;base64,{data})"


def _ratio(interval: dict[str, Any] | None) -> str | None:
    if not interval:
        return None
    low, mid, high = interval["ppl_ratio"]
    return f"{mid:.4f} [{low:.4f}, {high:.4f}]"


def publish_artifacts(settings: Settings, published: dict[str, Any], decision: GateDecision, train: dict[str, Any],
                      evaluation: dict[str, Any], timings: dict[str, float]) -> None:
    name = settings.registry.adapter_name
    pct = f"{100 * settings.registry.gate_confidence:.0f}% CI"
    gate = decision.to_dict()
    health = decision.health.get("candidate") or {}
    champion_health = decision.health.get("champion") or {}
    rows = [
        {"metric": "base perplexity", "value": round(evaluation["base_ppl"], 4)},
        {"metric": "adapter perplexity", "value": round(evaluation["adapter_ppl"], 4)},
        {"metric": "champion perplexity (this eval set)",
         "value": None if decision.champion_ppl is None else round(decision.champion_ppl, 4)},
        {"metric": "gate verdict", "value": gate["verdict"]},
        {"metric": f"adapter/base perplexity ratio ({pct})", "value": _ratio(decision.vs_base)},
        {"metric": f"adapter/champion perplexity ratio ({pct})", "value": _ratio(decision.vs_champion)},
        # The gate resamples chunks of up to data.max_length tokens; a long document is several.
        {"metric": "eval documents", "value": evaluation.get("eval_documents")},
        {"metric": "eval chunks (the gate's resampling units)", "value": gate["documents"]},
        {"metric": "eval tokens", "value": evaluation.get("eval_tokens")},
        {"metric": "generations ending with EOS (adapter / champion)",
         "value": f"{health.get('eos_rate')} / {champion_health.get('eos_rate', '-')}"},
        {"metric": "distinct-2 (adapter / champion)",
         "value": f"{health.get('distinct_2')} / {champion_health.get('distinct_2', '-')}"},
        {"metric": "general-text perplexity base -> adapter",
         "value": None if evaluation.get("general_adapter_ppl") is None else
         f"{evaluation.get('general_base_ppl'):.4f} -> {evaluation['general_adapter_ppl']:.4f}"},
        {"metric": "train tokens", "value": train.get("train_tokens")},
        {"metric": "train steps", "value": train.get("global_step")},
        {"metric": "final train loss", "value": train.get("final_loss")},
        {"metric": "train time (s)", "value": round(float(train.get("train_time_s") or 0), 1)},
        {"metric": "train tokens/s", "value": round(float(train.get("tokens_per_s") or 0), 1)},
    ] + [{"metric": f"wall time: {k} (s)", "value": round(v, 1)} for k, v in timings.items()]
    create_table_artifact(key=artifact_key(name, "metrics"), table=rows,
                          description=f"{name} {published['version']}: base vs adapter perplexity, gate, training throughput")
    verdict = "PROMOTED to" if decision.promote else "NOT promoted to"
    md = (
        f"# {name} {published['version']}: {verdict} `{settings.registry.promote_alias}`\n\n"
        f"{decision.reason}.\n\n"
        f"| | |\n|---|---|\n"
        f"| version | `{published['version']}` |\n"
        f"| location | `{published['uri']}` |\n"
        f"| base perplexity | {evaluation['base_ppl']:.4f} |\n"
        f"| adapter perplexity | {evaluation['adapter_ppl']:.4f} |\n"
        f"| adapter/base perplexity ratio ({pct}) | {_ratio(decision.vs_base) or '-'} |\n"
        f"| champion before this run | {decision.champion_version or '-'} |\n"
        f"| adapter/champion perplexity ratio ({pct}) | {_ratio(decision.vs_champion) or '-'} |\n"
        f"| eval documents (chunks) / tokens | {evaluation.get('eval_documents', '-')} ({gate['documents']}) / "
        f"{gate['tokens']} |\n"
        f"| generations ending with EOS | {health.get('eos_rate')} |\n\n"
        f"Use it:\n\n```bash\nloraflow pull {name}=={published['version']}\n```\n\n"
        f"## Training loss\n\n{_loss_curve_markdown(train.get('loss_curve_path'))}\n"
    )
    create_markdown_artifact(key=artifact_key(name, "version"), markdown=md,
                             description=f"published {name}=={published['version']}")


@flow(name="retrain")
def retrain(settings: Settings = seed_settings()) -> dict[str, Any]:
    """Retrain the LoRA adapter, evaluate it, publish it, and promote it if it is better."""
    with library_logs_in_prefect():
        # Decided once, before anything else runs: a worker's run without a storage location ends here.
        settings = for_flow_run(settings)
        # One run per adapter at a time, whichever deployment, schedule, trigger or click started it.
        with adapter_slot(settings.registry.adapter_name):
            return _retrain(settings)


def _retrain(settings: Settings) -> Any:
    logger = run_logger()
    started = time.perf_counter()
    run_key = current_run_key()
    timings: dict[str, float] = {}
    # The run's parameters may be partial (a Quick run): what it follows, in full, is shown with it.
    import json

    create_markdown_artifact(key=artifact_key(settings.registry.adapter_name, "spec"),
                             markdown=f"```json\n{json.dumps(settings.public_dict(), indent=2)}\n```\n",
                             description="the run's resolved settings (its spec)")

    from loraflow.stopping import at

    at("the change check")
    t = time.perf_counter()
    check = change_check_task(settings)
    timings["change check"] = time.perf_counter() - t
    if check["unchanged"] and not settings.registry.force:
        return skipped(settings, check, time.perf_counter() - started)
    logger.info("retraining: %s", "registry.force is set" if settings.registry.force and check["unchanged"]
                else "; ".join(check["changed"]))

    # Data preparation, training, evaluation and the champion's re-measurement run where the
    # accelerator is (the train-adapter flow); this flow keeps the gate and the publish.
    t = time.perf_counter()
    trained = train_remote(settings, run_key) if settings.prefect.train_deployment else \
        train_adapter_flow(settings, run_key=run_key)
    timings["training worker (wall)"] = time.perf_counter() - t
    train = {k: v for k, v in trained.items() if k not in ("data", "evaluation", "champion")}
    data, evaluation, champion = trained["data"], trained["evaluation"], trained["champion"]
    # The worker's own stages under the names they had when they ran here; re-measuring the
    # champion counts to the gate, as before.
    worker = train.get("worker_timings") or {}
    for key in ("preparation", "training", "evaluation"):
        timings[key] = worker.get(key, 0.0)

    t = time.perf_counter()
    decision = gate(settings, evaluation, champion)
    timings["gate"] = time.perf_counter() - t + worker.get("champion evaluation", 0.0)

    t = time.perf_counter()
    metrics = {**{k: evaluation[k] for k in ("base_ppl", "adapter_ppl", "base_eval_loss", "eval_loss",
                                                 "eval_tokens", "eval_documents") if k in evaluation},
               **{k: train.get(k) for k in ("global_step", "train_tokens", "train_time_s", "tokens_per_s", "final_loss")}}
    from prefect.runtime import flow_run

    at("publishing")
    published = publish_task(settings, train["adapter_dir"], train, evaluation, extra={
        "eval_fingerprint": evaluation.get("eval_fingerprint"),
        "flow_run_id": flow_run.id,
        "flow_run_name": flow_run.name,
        "gate": decision.to_dict(),
        "inputs": check["stamp"],
        "spec": settings.public_dict(),  # the whole resolved spec this run followed
    })
    timings["publishing"] = time.perf_counter() - t
    events.emit("published", published["name"], version=published["version"], metrics=metrics,
                gate=decision.to_dict(), flow_run_id=str(flow_run.id))

    t = time.perf_counter()
    if decision.promote:
        try:
            promote_task(settings, published["version"], champion["version"], reason=decision.reason,
                         gate=decision.to_dict())
        except LoraflowError as exc:
            decision = decision.refused(f"the {settings.registry.promote_alias} alias moved while this run was "
                                        f"deciding ({exc})")
    timings["gate"] += time.perf_counter() - t
    if decision.promote:
        logger.info("PROMOTED %s==%s to %s: %s", published["name"], published["version"],
                    settings.registry.promote_alias, decision.reason)
    else:
        logger.warning("published %s==%s but NOT promoted to %s: %s", published["name"], published["version"],
                       settings.registry.promote_alias, decision.reason)
        events.emit("promotion-refused", published["name"], version=published["version"],
                    alias=settings.registry.promote_alias, metrics=metrics, reason=decision.reason,
                    champion=champion["version"], gate=decision.to_dict(), flow_run_id=str(flow_run.id))

    try:
        from loraflow.checkpoints import delete_run

        delete_run(settings.storage, run_key)  # checkpoints are scratch once the version is published
    except LoraflowError as exc:
        logger.warning("could not remove the run's checkpoints: %s", exc)

    timings["flow total"] = time.perf_counter() - started
    publish_artifacts(settings, published, decision, train, evaluation, timings)
    # The version is published and the artifacts hold the loss curve: this machine's scratch for
    # the run (checkpoints, staged copy) goes. A failed run keeps it, for diagnosis.
    remove_run_scratch(run_key)
    return {
        **published,
        "flow_run_id": str(flow_run.id),
        "promoted": decision.promote,
        "reason": decision.reason,
        "gate": decision.to_dict(),
        "champion_before": champion["version"],
        "champion_ppl": champion["ppl"],
        "champion_remeasured": champion.get("remeasured", False),
        "metrics": metrics,
        "dataset_fingerprint": data["fingerprint"],
        "resumed_from_step": train.get("resumed_from_step", 0),
        "timings": timings,
        "pull_command": f"loraflow pull {published['name']}=={published['version']}",
    }
