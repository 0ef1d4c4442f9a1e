"""One retrain at a time per adapter (loraflow.flows.concurrency) against a real Prefect server:
two holders of one adapter's slot run one after the other, two adapters' slots do not block each
other, whichever code path holds them (threads here; the retrain flow holds it the same way)."""

from __future__ import annotations

import contextvars
import threading
import time
import uuid

import pytest

HOLD_S = 2.0


def _adapter(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # a fresh limit per test on the session's server


def _limit(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def _hold_in_threads(adapters: list[str], body) -> list[tuple[float, float]]:
    """Each thread enters its adapter's slot, runs `body(i)` inside, and records when it held it."""
    from loraflow.flows.concurrency import adapter_slot

    spans: list[tuple[float, float] | None] = [None] * len(adapters)
    errors: list[BaseException] = []

    def hold(i: int) -> None:
        try:
            with adapter_slot(adapters[i], timeout_s=120):
                start = time.monotonic()
                body(i)
                spans[i] = (start, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    # Prefect's settings (the fixture's API URL) live in context variables, which a new thread
    # does not inherit: each holder runs in a copy of the test's context, as a flow run would.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(hold, i)) for i in range(len(adapters))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if errors:
        raise errors[0]
    assert all(spans), "a holder never got its slot"
    return spans  # type: ignore[return-value]


def test_two_runs_of_one_adapter_serialise(prefect_server):
    from loraflow.flows.concurrency import limit_name

    adapter = _adapter("same")
    overlaps: list[int] = []
    count = [0]
    lock = threading.Lock()

    def body(i: int) -> None:
        with lock:
            count[0] += 1
            overlaps.append(count[0])
        time.sleep(HOLD_S)
        with lock:
            count[0] -= 1

    (a_start, a_end), (b_start, b_end) = sorted(_hold_in_threads([adapter, adapter], body))
    assert max(overlaps) == 1, "both holders were inside at once"
    assert b_start >= a_end
    limit = _limit(limit_name(adapter))
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)  # created with 1, all released


def test_two_adapters_do_not_block_each_other(prefect_server):
    # Each holder waits inside its slot until the other is inside too: only possible if neither blocks.
    both_inside = threading.Barrier(2, timeout=60)
    spans = _hold_in_threads([_adapter("one"), _adapter("two")], lambda i: (both_inside.wait(), time.sleep(0.2)))
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start < a_end


def test_a_held_slot_times_out_with_a_clear_error_and_an_existing_limit_is_kept(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from loraflow.flows.concurrency import adapter_slot, ensure_limit

    adapter = _adapter("held")
    name = ensure_limit(adapter)
    assert ensure_limit(adapter) == name  # idempotent
    with adapter_slot(adapter, timeout_s=30):
        with pytest.raises(TimeoutError, match=f"another retrain of '{adapter}' held concurrency slot {name}"):
            with adapter_slot(adapter, timeout_s=1):
                pass
    # An operator's setting survives the next run's ensure_limit.
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=2))
    with adapter_slot(adapter, timeout_s=30), adapter_slot(adapter, timeout_s=30):
        assert _limit(name).active_slots == 2
    assert _limit(name).limit == 2
    # `prefect gcl disable NAME` switches the wait off (and is not undone by the next run either).
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=False))
    with adapter_slot(adapter, timeout_s=5), adapter_slot(adapter, timeout_s=5):
        pass
    assert not _limit(name).active


def test_a_flow_run_holds_the_slot_as_itself(prefect_server):
    from prefect import flow

    from loraflow.flows.concurrency import adapter_slot, limit_name

    adapter = _adapter("flow")

    @flow(name="slot-holder")
    def holder_flow() -> str:
        with adapter_slot(adapter, timeout_s=30) as name:
            return name

    assert holder_flow() == limit_name(adapter)
    assert _limit(limit_name(adapter)).active_slots == 0
