"""`loraflow run` with a Prefect server configured (what `make up` sets up): the run is submitted to
the `retrain` deployment and lands on the work pools' real workers (training on the gpu pool), and
the command prints the run's URL, follows its logs and exits with its final state."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from fixtures_prefect import ROOT, tiny_flow_settings
from fixtures_s3 import create_bucket
from test_deployments import _start_worker, _stop, applied_deployments  # noqa: F401 - a fixture


def test_loraflow_run_submits_to_the_deployment_and_follows_it(
        prefect_server, applied_deployments, s3_server, tiny_model_dir, imdb_data_dir, tmp_path):  # noqa: F811
    from loraflow.registry import list_versions, read_manifest

    bucket = create_bucket(s3_server, "submit-")
    settings = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, name="imdb-submitted",
                                  max_steps=2, save_steps=2)
    config = tmp_path / "tiny.yaml"
    public = settings.model_dump(mode="json")
    public["storage"]["endpoint_url"] = None  # where the store is belongs to the workers' environment
    config.write_text(yaml.safe_dump(public))

    env = {**prefect_server.env, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "LORAFLOW_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
           "LORAFLOW_HOME": str(tmp_path / "worker-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    workers = [_start_worker(prefect_server, pool, env, tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]
    try:
        cli_env = {**prefect_server.env, "LORAFLOW_HOME": str(tmp_path / "cli-home")}
        done = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "--config", str(config), "--json"],
                              env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        for worker in workers:
            _stop(worker)
    logs = "\n".join(p.read_text()[-1500:] for p in tmp_path.glob("worker-*.log"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
    out = done.stdout.splitlines()
    assert out[0].startswith("submitted retrain/retrain-imdb: flow run")
    assert out[1].strip().startswith(prefect_server.url) and "/runs/flow-run/" in out[1]
    assert json.loads(out[-1])["state"] == "Completed"
    assert "published imdb-submitted" in done.stderr  # the run's own log lines, followed live
    [version] = list_versions(settings, "imdb-submitted")
    manifest = read_manifest(settings, "imdb-submitted", version["version"])
    assert manifest["flow_run_id"] == json.loads(out[-1])["flow_run_id"]
    assert not (tmp_path / "cli-home" / "runs").exists()  # nothing ran in the CLI's process
