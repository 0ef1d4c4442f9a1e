"""The Prefect flows end to end: real Prefect server, real S3 server (rclone), real training of a
2-layer GPT-2 on real IMDB reviews."""

from __future__ import annotations

import json
import secrets
import shutil
import time

import pytest
from fixtures_prefect import tiny_flow_settings

pytestmark = pytest.mark.slow


def _fresh_bucket(s3_server) -> str:
    bucket = "flows-" + secrets.token_hex(4)
    (s3_server.root / bucket).mkdir()
    return bucket


def _run_artifacts_and_logs(flow_run_id: str):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    async def read():
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return artifacts, logs

    for _ in range(20):  # logs are shipped in the background
        artifacts, logs = asyncio.run(read())
        if any(log.name.startswith("loraflow") for log in logs):
            break
        time.sleep(0.5)
    return artifacts, logs


def test_retrain_promotes_then_publishes_without_promoting_a_worse_adapter(
        prefect_server, s3_server, tiny_model_dir, imdb_data_dir, flow_home):
    from flows.retrain import retrain

    from loraflow.registry import get_alias, list_versions, read_manifest

    bucket = _fresh_bucket(s3_server)
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir)
    first = retrain(settings)

    assert first["promoted"], first["reason"]
    assert first["metrics"]["adapter_ppl"] < first["metrics"]["base_ppl"]
    manifest = read_manifest(settings, "imdb-tiny", first["version"])
    assert manifest["version"] == first["version"]
    assert {f["name"] for f in manifest["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert manifest["metrics"]["adapter_ppl"] == pytest.approx(first["metrics"]["adapter_ppl"])
    assert manifest["eval_fingerprint"] and manifest["flow_run_id"] == first["flow_run_id"]
    assert get_alias(settings, "imdb-tiny", "champion") == first["version"]
    # Checkpoints are scratch: removed once the version is published.
    assert not list((s3_server.root / bucket).glob("checkpoints/*/*"))

    artifacts, logs = _run_artifacts_and_logs(first["flow_run_id"])
    by_type = {a.type: a for a in artifacts}
    assert {"table", "markdown"} <= set(by_type)
    markdown = by_type["markdown"].data
    assert "PROMOTED to" in markdown and f"loraflow pull imdb-tiny=={first['version']}" in markdown
    assert "data:image/png;base64," in markdown  # the loss curve, embedded
    table = by_type["table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert any(row["metric"] == "adapter perplexity" and row["value"] == pytest.approx(
        first["metrics"]["adapter_ppl"], rel=1e-3) for row in rows)
    # The library's own log lines (PREFECT_LOGGING_EXTRA_LOGGERS=loraflow) reach the run's logs.
    assert any(log.name == "loraflow.registry" and "published imdb-tiny" in log.message for log in logs)

    # Learning rate 0: the adapter equals the base model, so it cannot beat it; published, not promoted.
    second = retrain(tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, learning_rate=0.0))
    assert not second["promoted"]
    assert "does not beat the base model" in second["reason"]
    assert get_alias(settings, "imdb-tiny", "champion") == first["version"]
    assert {v["version"] for v in list_versions(settings, "imdb-tiny")} >= {first["version"], second["version"]}
    artifacts, _ = _run_artifacts_and_logs(second["flow_run_id"])
    assert "NOT promoted to" in next(a.data for a in artifacts if a.type == "markdown")


class _CrashAfterStep:
    """A worker dying mid-training: after `step`, its disk is gone and the process stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def callback(self):
        from transformers import TrainerCallback

        crash_step = self.step

        class Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == crash_step:
                    shutil.rmtree(args.output_dir, ignore_errors=True)
                    raise RuntimeError(f"injected crash at step {crash_step}")

        return Crash()


def test_crashed_training_resumes_from_the_stored_checkpoint(
        prefect_server, s3_server, tiny_model_dir, imdb_data_dir, flow_home, monkeypatch):
    from flows.train_adapter import train_adapter_flow
    from transformers import TrainerCallback

    from loraflow import training
    from loraflow.checkpoints import latest_checkpoint

    steps_per_attempt: list[list[int]] = []

    class RecordSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            steps_per_attempt.append([])

        def on_step_end(self, args, state, control, **kwargs):
            steps_per_attempt[-1].append(state.global_step)

    real_train = training.train_adapter
    crash = _CrashAfterStep(5)

    def train_with_fault(settings, **kwargs):
        extra = [RecordSteps()] + ([crash.callback()] if not steps_per_attempt else [])
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + extra
        return real_train(settings, **kwargs)

    monkeypatch.setattr(training, "train_adapter", train_with_fault)
    bucket = _fresh_bucket(s3_server)
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, max_steps=8)
    run_key = "crash-" + secrets.token_hex(4)

    result = train_adapter_flow(settings, run_key=run_key)

    assert len(steps_per_attempt) == 2, "the task should have been retried once"
    assert steps_per_attempt[0] == [1, 2, 3, 4, 5]
    # The retry found no local files (the crash removed them): it downloaded checkpoint-4 from
    # storage, verified it, and continued at step 5, not at step 1.
    assert steps_per_attempt[1][0] == 5 and steps_per_attempt[1][-1] == 8
    assert result["resumed_from_step"] == 4
    assert result["global_step"] == 8
    stored = latest_checkpoint(settings.storage, run_key)
    assert stored is not None and stored.step == 8
    assert result["staged_uri"].endswith(f"checkpoints/{run_key}/final/")
