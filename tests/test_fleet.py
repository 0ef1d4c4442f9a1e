"""The fleet (docs/fleet.md): one YAML file of adapters (loraflow.fleet) and the `retrain-fleet` flow,
run by a real Prefect server's deployment on real workers (cpu and gpu pools), with real training
of a 2-layer GPT-2 on real IMDB reviews and a real S3 server (rclone)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from fixtures_prefect import ROOT, tiny_flow_settings, wait_final_state
from fixtures_s3 import create_bucket, make_adapter_dir
from test_deployments import _pause_schedules, _start_worker, _stop, applied_deployments  # noqa: F401 - a fixture

from loraflow.errors import ConfigError

EXAMPLE = ROOT / "deployments" / "fleet.example.yaml"


def _resolve(doc):
    from loraflow.fleet import resolve

    return resolve(doc, "fleet.yaml")


def test_a_fleet_file_gives_each_adapter_one_full_spec():
    fleet = _resolve({
        "name": "reviews", "max_parallel": 3,
        "defaults": {"lora": {"r": 8}, "training": {"max_steps": 50}, "storage": {"endpoint_url": "aws", "bucket": "acme"}},
        "adapters": [{"name": "en", "source": "s3://acme/reviews/en/", "settings": {"training": {"max_steps": 7}}},
                     {"name": "de", "source": "s3://acme/reviews/de/"}]})
    en, de = fleet.specs["en"], fleet.specs["de"]
    assert (en.registry.adapter_name, en.data.source, en.lora.r, en.training.max_steps) == ("en", "s3://acme/reviews/en/", 8, 7)
    assert (de.registry.adapter_name, de.data.source, de.lora.r, de.training.max_steps) == ("de", "s3://acme/reviews/de/", 8, 50)
    assert de.lora.lora_alpha == 32 and de.storage.bucket == "acme"  # the rest: the documented defaults
    assert fleet.limit_name == "loraflow-fleet-reviews" and fleet.max_parallel == 3
    assert fleet.data_landed_resources() == ["loraflow.data.s3://acme/reviews/en/", "loraflow.data.s3://acme/reviews/de/"]
    assert list(fleet.select(["de"])) == ["de"] and list(fleet.select([])) == ["en", "de"]
    with pytest.raises(ConfigError, match=r"^fleet reviews \(fleet.yaml\) has no adapter 'fr'; it has en, de$"):
        fleet.select(["de", "fr"])


@pytest.mark.parametrize("doc, message", [
    ({"name": "f", "adapters": [{"name": "a", "source": "s", "settings": {"lora": {"r": 0}}}]},
     "fleet fleet.yaml: adapter 'a': lora.r: Input should be greater than 0"),
    ({"name": "f", "adapters": [{"name": "a", "source": "s"}, {"name": "b", "source": "t"}, {"name": "a", "source": "u"}]},
     "fleet fleet.yaml: adapter 'a': the name is used twice (adapters #1 and #3)"),
    ({"name": "f", "adapters": [{"name": "a", "source": "s", "settings": {"data": {"source": "t"}}}]},
     "fleet fleet.yaml: adapter 'a': data.source is set by the adapter's `source`"),
    ({"name": "f", "adapters": [{"name": "a", "sorce": "s"}]},
     "fleet fleet.yaml: adapter 'a': source: Field required\nfleet fleet.yaml: adapter 'a': sorce: unknown key"),
    ({"name": "f", "defaults": {"training": {"max_stepz": 3}}, "adapters": [{"name": "a", "source": "s"}]},
     "fleet fleet.yaml: defaults: training.max_stepz: unknown setting"),
    ({"name": "f", "adapters": []}, "fleet fleet.yaml: adapters: List should have at least 1 item after validation, not 0"),
])
def test_a_bad_fleet_file_is_refused_naming_the_adapter_and_the_field(doc, message):
    with pytest.raises(ConfigError) as err:
        _resolve(doc)
    assert str(err.value) == message


def test_the_example_fleet_and_its_deployment_agree():
    from loraflow.fleet import load_fleet

    fleet = load_fleet(EXAMPLE)
    assert len(fleet.specs) == 3 and all(s.prefect.train_deployment == "train-adapter/train-adapter"
                                         for s in fleet.specs.values())
    deployment = next(d for d in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
                      if d["name"] == "retrain-fleet")
    assert deployment["parameters"]["fleet"] == str(EXAMPLE.relative_to(ROOT))
    [trigger] = deployment["triggers"]
    assert trigger["expect"] == ["loraflow.data.landed"]
    # The trigger starts the fleet for exactly its sources' events.
    assert trigger["match"]["prefect.resource.id"] == fleet.data_landed_resources()


# --- on a real server and real workers ---------------------------------------------------------

def _copy_source(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _land_new_data(source: Path, n: int = 4) -> None:
    train = source / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()[:n]]
    with train.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**row, "text": row["text"] + " (a second look)"}) + "\n")


def _seed_champion(spec, adapter_dir: Path) -> str:
    """What a retrain would leave: a published version whose manifest records the stamp of the
    inputs it was trained on (loraflow.changes), as `champion`. A real PEFT adapter, not trained."""
    from loraflow.changes import input_stamp
    from loraflow.registry import publish_adapter, set_alias

    published = publish_adapter(spec, adapter_dir, aliases=[], extra={"inputs": input_stamp(spec)})
    set_alias(spec, spec.registry.adapter_name, "champion", published.version, expected_version=None,
              reason="seeded by tests/test_fleet.py")
    return published.version



async def _deployment_runs(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        return deployment, await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


def _event_starts_the_fleet(prefect_server, monkeypatch, cli) -> None:
    """`loraflow emit data-landed` for a source of the example fleet starts one retrain-fleet run
    (cancelled here: no worker is up yet)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from loraflow.fleet import load_fleet

    source = load_fleet(EXAMPLE).sources()[0]
    _, before = asyncio.run(_deployment_runs("retrain-fleet/retrain-fleet"))
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    code, out, err = cli("emit", "data-landed", source)
    assert code == 0, err
    new = []
    for _ in range(120):  # the server's triggers service acts within seconds
        _, runs = asyncio.run(_deployment_runs("retrain-fleet/retrain-fleet"))
        new = [r for r in runs if r.id not in {b.id for b in before}]
        if new:
            break
        time.sleep(1)

    async def cancel_scheduled():  # retrain-on-new-data matches every source: its run goes too
        async with get_client() as client:
            for name in ("retrain-fleet/retrain-fleet", "retrain/retrain-on-new-data"):
                _, runs = await _deployment_runs(name)
                for run in runs:
                    if not run.state.is_final():
                        await client.set_flow_run_state(run.id, Cancelled(), force=True)

    asyncio.run(cancel_scheduled())
    assert len(new) == 1, "a loraflow.data.landed event for a fleet source should start one retrain-fleet run"
    assert new[0].parameters["fleet"] == "deployments/fleet.example.yaml"


def _summary(flow_run_id) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    [artifact] = [a for a in asyncio.run(read()) if a.type == "table"]
    assert artifact.key == "fleet-tiny12-summary"
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


@pytest.mark.slow
def test_a_fleet_of_12_retrains_the_2_with_new_data_and_a_broken_source_fails_alone(
        prefect_server, applied_deployments, s3_server, tiny_model_dir, imdb_data_dir, tmp_path, flow_home,  # noqa: F811
        monkeypatch, cli):
    from prefect.client.orchestration import get_client

    from loraflow.fleet import load_fleet
    from loraflow.registry import get_alias, list_versions

    asyncio.run(_pause_schedules("retrain-fleet/retrain-fleet"))  # its daily run is not this test's
    _event_starts_the_fleet(prefect_server, monkeypatch, cli)

    bucket = create_bucket(s3_server, "fleet-")
    tiny = tiny_flow_settings(s3_server, bucket, tiny_model_dir, imdb_data_dir, max_steps=2, save_steps=2)
    defaults = tiny.model_dump(mode="json")
    del defaults["registry"]["adapter_name"], defaults["data"]["source"]
    defaults["prefect"]["train_deployment"] = "train-adapter/train-adapter"
    names = [f"tiny-{i:02d}" for i in range(12)]
    sources = {name: _copy_source(imdb_data_dir, tmp_path / "data" / name) for name in names}
    broken = tmp_path / "data" / "broken"
    broken.mkdir(parents=True)
    (broken / "train.jsonl").write_text("this is not JSON\n")
    (broken / "test.jsonl").write_text("nor is this\n")
    doc = {"name": "tiny12", "max_parallel": 3, "defaults": defaults,
           "adapters": [{"name": n, "source": str(s)} for n, s in sources.items()]
           + [{"name": "tiny-broken", "source": str(broken)}]}
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    fleet = load_fleet(fleet_file)

    # The 12 have champions trained on their current data; the broken one has none.
    t = time.monotonic()
    adapter_dir = make_adapter_dir(tmp_path / "seed-adapter", tiny_model_dir)
    champions = {name: _seed_champion(fleet.specs[name], adapter_dir) for name in names}
    print(f"seeded 12 champions in {time.monotonic() - t:.1f} s")
    landed = ["tiny-03", "tiny-07"]
    for name in landed:
        _land_new_data(sources[name])

    env = {**prefect_server.env, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "LORAFLOW_HOME": str(tmp_path / "worker-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    workers = [_start_worker(prefect_server, pool, env, tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]

    async def submit():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("retrain-fleet/retrain-fleet")
            return await client.create_flow_run_from_deployment(deployment.id, parameters={"fleet": str(fleet_file)})

    try:
        t = time.monotonic()
        run = wait_final_state(asyncio.run(submit()).id, timeout=480)
        print(f"fleet run: {time.monotonic() - t:.1f} s, {run.state.type.value}: {run.state.message}")
    finally:
        for worker in workers:
            _stop(worker)
    logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("worker-*.log"))

    # One failing adapter fails its own branch; the run says how many of each and is Failed.
    assert run.state.is_failed(), f"{run.state}\n{logs}"
    assert run.state.message == "2 trained, 10 skipped, 1 failed (tiny-broken)", logs
    rows = {row["adapter"]: row for row in _summary(run.id)}
    assert list(rows) == [*names, "tiny-broken"]
    assert {n for n, r in rows.items() if r["result"] == "trained"} == set(landed)
    for name in names:
        if name in landed:
            [new] = [v["version"] for v in list_versions(fleet.specs[name], name) if v["version"] != champions[name]]
            assert rows[name]["version"] == new and "adapter ppl" in rows[name]["metrics"]
            assert rows[name]["verdict"].startswith(("promoted: ", "not promoted: "))
            expected = new if rows[name]["verdict"].startswith("promoted") else champions[name]
            assert get_alias(fleet.specs[name], name, "champion") == expected
        else:
            assert rows[name] == {"adapter": name, "result": "skipped", "metrics": "-",
                                  "verdict": "unchanged since its champion", "version": champions[name]}
            assert [v["version"] for v in list_versions(fleet.specs[name], name)] == [champions[name]]
    assert rows["tiny-broken"]["result"] == "failed" and "train-adapter" in rows["tiny-broken"]["verdict"]
    assert list_versions(fleet.specs["tiny-broken"], "tiny-broken") == []

    # Each changed adapter ran the retrain flow (a subflow of its branch), which trained on the gpu pool.
    _, train_runs = asyncio.run(_deployment_runs("train-adapter/train-adapter"))

    async def retrain_runs():
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName

        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                                               flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="tiny12-")))

    branches = {r.name: r for r in asyncio.run(retrain_runs())}
    assert set(branches) == {"tiny12-tiny-03", "tiny12-tiny-07", "tiny12-tiny-broken"}
    assert all(r.parent_task_run_id is not None for r in branches.values())

    async def logs_of(flow_run_id):
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    # A branch's retrain run keeps its own logs (its lines, not the fleet run's), as a lone retrain does.
    own = [log.message for log in asyncio.run(logs_of(branches["tiny12-tiny-03"].id))]
    assert any(m.startswith("retraining: data ") for m in own) and any("published tiny-03" in m for m in own), own[-20:]
    ours = [r for r in train_runs if r.parameters.get("run_key") in {str(b.id) for b in branches.values()}]
    assert sorted(r.state.type.value for r in ours) == ["COMPLETED", "COMPLETED", "FAILED"]
    assert all(r.work_pool_name == "gpu" for r in ours)

    async def limit():
        async with get_client() as client:
            return await client.read_global_concurrency_limit_by_name("loraflow-fleet-tiny12")

    assert asyncio.run(limit()).limit == 3

    # A chosen subset (the UI's `adapters` field): only those are checked; nothing changed, so Completed.
    from loraflow.flows.fleet import retrain_fleet

    state = retrain_fleet(str(fleet_file), adapters=["tiny-01", "tiny-05"], return_state=True)
    assert state.is_completed() and state.message == "0 trained, 2 skipped, 0 failed"
    summary = state.result()
    assert [r["adapter"] for r in summary["adapters"]] == ["tiny-01", "tiny-05"]
    print(f"change check of 2 adapters in-process: {summary['timings']['change check']:.2f} s")
