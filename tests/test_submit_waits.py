"""What `loraflow run --deployment` says while its run waits, from a real Prefect server's answers:
a deployment slot held by another run (AwaitingConcurrencySlot, naming the holder), a late run on a
work pool no worker polls; each said once, and its end once. The workers' per-poll "submitting ... /
Aborted submission" pairs are left out of what it prints."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from test_deployments import applied_deployments  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow


def test_worker_submission_pairs_are_noise_and_other_worker_lines_are_not():
    from loraflow.cli.submit import _is_noise

    def line(message, name="prefect.flow_runs.worker"):
        return SimpleNamespace(name=name, message=message)

    assert _is_noise(line("Worker 'local-cpu' submitting flow run '90cad0f3-3cd3-4a7d-927b-fc24bf0012e6'"))
    assert _is_noise(line("Aborted submission of flow run '90cad0f3'. Server sent an abort signal: "
                          "Deployment concurrency limit reached."))
    assert not _is_noise(line("Flow run 'fair-firefly' submitted to infrastructure"))
    assert not _is_noise(line("Aborted submission of flow run 'x'", name="loraflow.train"))


def test_waits_name_the_slot_and_its_holder_once(prefect_server, applied_deployments):  # noqa: F811
    import secrets
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Cancelled, Pending, Running, Scheduled

    from loraflow.cli.submit import Waits

    pool_name = f"idle-{secrets.token_hex(3)}"  # no worker ever polled it, whatever ran before

    async def scenario():
        async with get_client() as client:
            demo = await client.read_deployment_by_name("retrain/retrain-demo")
            await client.create_work_pool(WorkPoolCreate(name=pool_name, type="process"))
            train_id = await client.create_deployment(flow_id=demo.flow_id, name=pool_name, work_pool_name=pool_name)
            train = await client.read_deployment(train_id)
            holder = await client.create_flow_run_from_deployment(demo.id, parameters={"settings": {}})
            waiting = await client.create_flow_run_from_deployment(demo.id, parameters={"settings": {}})
            orphan = await client.create_flow_run_from_deployment(train.id, parameters={})
            try:
                # What a worker does: Pending takes the deployment's slot, then Running.
                assert (await client.set_flow_run_state(holder.id, Pending())).state.is_pending()
                await client.set_flow_run_state(holder.id, Running())
                refused = await client.set_flow_run_state(waiting.id, Pending())
                assert refused.state.name == "AwaitingConcurrencySlot"
                # A run on a pool no worker polls, five minutes late.
                late = datetime.now(timezone.utc) - timedelta(minutes=5)
                await client.set_flow_run_state(orphan.id, Scheduled(scheduled_time=late), force=True)

                waits = Waits(client, waiting.id, "smollm2-imdb")
                runs = [await client.read_flow_run(r) for r in (waiting.id, orphan.id)]
                first = await waits.check(runs)
                again = await waits.check(runs)
                for run_id in (holder.id, waiting.id, orphan.id):
                    await client.set_flow_run_state(run_id, Cancelled(), force=True)
                runs = [await client.read_flow_run(r) for r in (waiting.id, orphan.id)]
                ended = await waits.check(runs)
                return holder, waiting, orphan, first, again, ended
            finally:
                for run_id in (holder.id, waiting.id, orphan.id):
                    await client.set_flow_run_state(run_id, Cancelled(), force=True)

    holder, waiting, orphan, first, again, ended = asyncio.run(scenario())
    assert len(first) == 2, first
    slot = next(line for line in first if "AwaitingConcurrencySlot" in line)
    assert slot.startswith(f"waiting: flow run {waiting.name!r} is AwaitingConcurrencySlot: deployment "
                           "retrain/retrain-demo runs 1 at a time")
    assert f"held by flow run {holder.name!r} (retrain/retrain-demo), Running" in slot
    pool = next(line for line in first if "pool" in line and line is not slot)
    assert pool == (f"waiting: flow run {orphan.name!r} (retrain/{pool_name}) waits for the {pool_name} pool: "
                    f"no worker polls it (start one: prefect worker start --pool {pool_name})")
    assert again == []  # said once
    assert sorted(line.split(" after ")[0] for line in ended) == [
        "done waiting for the deployment's concurrency slot", "done waiting for the work pool"]
