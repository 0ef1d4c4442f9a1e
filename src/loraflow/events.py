"""Prefect events for registry changes, so users can attach automations (notify a channel, trigger
a downstream deployment) to them:

    loraflow.adapter.published            a new version exists
    loraflow.adapter.promoted             an alias (champion) moved to a version by the gate or by hand
    loraflow.adapter.promotion-refused    the gate kept the champion; the payload says why
    loraflow.adapter.rolled-back          `loraflow rollback` moved an alias back

Resource `loraflow.adapter.<name>`; payload: version, alias, metrics, and what else the caller
adds. The one module of the library that touches Prefect: it imports prefect lazily and only
when a Prefect API is configured (PREFECT_API_URL, or inside a flow run); otherwise, or when
prefect is not installed, emitting is a no-op. An event that cannot be sent is logged, never
raised: a registry change must not fail because the notification did.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from loraflow.log import get_logger

log = get_logger("events")

EVENTS = ("published", "promoted", "promotion-refused", "rolled-back")


def current_flow_run_id() -> str | None:
    """The Prefect flow run this code runs in, if any. Without prefect already imported there can
    be none (loraflow never imports it just to ask)."""
    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT__FLOW_RUN_ID") or None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - runtime lookups must never break a registry call
        return None


def api_configured() -> bool:
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" not in sys.modules:
        return False  # a profile-only API URL counts once something has imported prefect
    try:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value()) or current_flow_run_id() is not None
    except Exception:  # noqa: BLE001
        return False


def emit(event: str, name: str, *, version: str | None = None, alias: str | None = None,
         metrics: dict[str, Any] | None = None, **payload: Any) -> bool:
    """Emit `loraflow.adapter.<event>` for adapter `name`. True when it was handed to Prefect."""
    if event not in EVENTS:
        raise ValueError(f"unknown loraflow event {event!r}; expected one of {', '.join(EVENTS)}")
    if not api_configured():
        return False
    try:
        from prefect.events import emit_event
    except ImportError:
        return False
    body = {"name": name, "version": version, "alias": alias, "metrics": metrics or {}, **payload}
    try:
        sent = emit_event(event=f"loraflow.adapter.{event}",
                          resource={"prefect.resource.id": f"loraflow.adapter.{name}",
                                    "prefect.resource.name": name, "loraflow.version": version or ""},
                          payload=body)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.warning("could not emit loraflow.adapter.%s for %s: %s", event, name, exc)
        return False
    return sent is not None


def flush(timeout: float = 10.0) -> None:
    """Send queued events now (a short-lived process, e.g. the CLI, before it exits)."""
    if "prefect.events" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not flush Prefect events: %s", exc)
