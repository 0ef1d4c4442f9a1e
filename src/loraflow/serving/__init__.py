"""The reference service behind `loraflow serve REF [REF ...]`: OpenAI-style completions and chat
on transformers + peft for several adapters of one base, generated in one batch across adapters,
each followed alias hot-swapped without failing a request.

    model.py      the model and its adapters: one base, loaded versions, in-flight counts, LRU bound
    scheduler.py  the one generation loop: continuous batching across adapters (PEFT adapter_names)
    canary.py     the checks a new version passes before it gets traffic
    metrics.py    Prometheus metrics (a registry per service)
    service.py    routes (NAME@ALIAS followed, NAME==VERSION pinned): load beside -> canary -> switch
    app.py        the FastAPI app (request schemas, streaming, 4xx answers, /metrics)

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
