"""The reference service behind `loraflow serve NAME@ALIAS`: an OpenAI-style completions endpoint
on transformers + peft that follows an alias and hot-swaps versions without failing a request.

    model.py    the model and its adapters: one base, several loaded versions, in-flight counts
    canary.py   the checks a new version passes before it gets traffic
    metrics.py  Prometheus metrics (a registry per service)
    service.py  follower -> load beside the current -> canary -> switch -> unload the old
    app.py      the FastAPI app (request schemas, 4xx answers, /metrics)

Nothing here imports Prefect; FastAPI, uvicorn and prometheus-client come with it anyway.
"""

from __future__ import annotations

__all__ = ["Service", "ServeOptions", "create_app"]


def __getattr__(name: str):
    if name in ("Service", "ServeOptions"):
        from loraflow.serving import service

        return getattr(service, name)
    if name == "create_app":
        from loraflow.serving.app import create_app

        return create_app
    raise AttributeError(name)
