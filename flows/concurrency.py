"""One retrain at a time per adapter, whoever starts it: a Prefect global concurrency limit named
after the adapter (`loraflow-retrain-<adapter name>`, limit 1), held by the `retrain` flow for its
whole run.

Why a global concurrency limit and not the deployments' `concurrency_limit`: in Prefect 3 a
deployment's limit belongs to that deployment alone (its own `deployment:<id>` limit), so
`retrain-imdb` (weekly) and `retrain-on-new-data` (every 15 minutes, on events) could each run one
retrain of the same adapter at once, and so could a UI run or `loraflow run --deployment`. Two such
runs race on the registry and waste a GPU run. A named limit is shared by every flow run that asks
for it, from any deployment or none; naming it after the adapter keeps different adapters (e.g.
`retrain-demo`'s smollm2-imdb) independent.

How `retrain` uses it (the whole run, change check included, so that a run that waited sees the
champion the other one just published and usually ends Skipped in seconds):

    from loraflow.flows.concurrency import adapter_slot

    @flow(name="retrain")
    def retrain(settings: Settings = seed_settings()) -> dict[str, Any]:
        with library_logs_in_prefect(), adapter_slot(settings.registry.adapter_name):
            return _retrain(settings)

Only the outermost flow takes it: `train_adapter_flow`, run in-process as a subflow of a run that
holds the slot, must not (limit 1: it would wait for its own parent forever).

The slot is a lease (Prefect >= 3.4): renewed in the background while the run lives, and freed by
the server within `LEASE_S` when the process dies without releasing it (a killed worker), so a
crashed run never blocks the adapter for good.

Operators can change the behaviour without a deploy: `prefect gcl update loraflow-retrain-NAME
--limit 2` lets two runs overlap, `prefect gcl disable loraflow-retrain-NAME` switches the wait off;
`adapter_slot` creates a missing limit but never overwrites an existing one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from loraflow.log import get_logger

log = get_logger("flows")

LIMIT_PREFIX = "loraflow-retrain-"
# Seconds the server keeps the slot after the holder stops renewing it (renewed every 75% of it).
# Long enough to ride out a Prefect server restart, short enough that a dead worker's slot frees
# itself before the next 15-minute poll.
LEASE_S = 300.0


def limit_name(adapter_name: str) -> str:
    return LIMIT_PREFIX + adapter_name


def ensure_limit(adapter_name: str) -> str:
    """Create the adapter's limit (limit 1) if it does not exist; returns its name."""
    return ensure_named_limit(limit_name(adapter_name), 1, f"one retrain of {adapter_name} at a time")


def ensure_named_limit(name: str, limit: int, what: str) -> str:
    """Create the global concurrency limit `name` with `limit` slots if it does not exist; returns `name`.

    In Prefect 3.9 `concurrency()` on a missing limit does not create it: it logs a warning and
    runs without any limit (or, with `strict=True`, raises). Creating it here, at the start of the
    run, covers every adapter name a run can be given, which no setup script could list in advance.
    Read first (the common case: it exists), then one POST, answered 409 when another run created
    it in between: both are fine, and an operator's changed limit (or a disabled one) is kept.
    (A POST on an existing name also makes the server log an IntegrityError traceback, which an
    ephemeral server prints into the user's terminal: hence the read.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return name
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            log.info("created concurrency limit %s (limit %d): %s", name, limit, what)
        except ObjectAlreadyExists:
            pass
    return name


def _holder():
    """This flow run as the slot's holder (shown with the limit in the UI), or None outside one."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None


@contextmanager
def adapter_slot(adapter_name: str, *, timeout_s: float | None = None) -> Iterator[str]:
    """Hold the adapter's retrain slot for the body; yields the limit's name.

    Waits while another run of the same adapter holds it (Prefect retries every few seconds, at
    most 30 s apart, so the wait ends soon after the slot frees), forever by default; with
    `timeout_s`, raises TimeoutError after that long. Synchronous code only (the retrain flow is
    sync); an async flow would use prefect.concurrency.asyncio.concurrency with the same name."""
    with held(ensure_limit(adapter_name), f"another retrain of {adapter_name!r}", timeout_s=timeout_s) as name:
        yield name


@contextmanager
def held(name: str, holders: str, *, timeout_s: float | None = None) -> Iterator[str]:
    """Hold one slot of the existing global concurrency limit `name` for the body (see adapter_slot);
    `holders` says who holds the others, for the timeout's message."""
    from prefect.concurrency.sync import concurrency

    started = time.monotonic()
    with ExitStack() as stack:
        try:
            # strict: the limit was just ensured, so "does not exist" means something is wrong and
            # must not silently mean "no limit". A failed lease renewal (e.g. the server restarting
            # mid-run) only warns: hours of training are not cancelled for a bookkeeping hiccup.
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S,
                                            strict=True, holder=_holder(), raise_on_lease_renewal_failure=False))
        except TimeoutError:
            raise TimeoutError(f"{holders} held concurrency slot {name} for more than {timeout_s:g} s") from None
        waited = time.monotonic() - started
        log.info("holding concurrency slot %s%s", name, f" (waited {waited:.0f} s for {holders})" if waited >= 5 else "")
        yield name
