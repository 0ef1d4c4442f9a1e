"""The HTTP face of a `Service`: OpenAI-style `/v1/completions`, `/v1/models`, `/v1/adapter`,
`/health` and `/metrics`.

Bad requests are answered 400 in OpenAI's error shape, `{"error": {"message", "type", "param"}}`,
with pydantic's message naming the field (`max_tokens: Input should be greater than or equal to 1`);
a request before the first version is loaded gets 503. Handlers are plain functions, which
FastAPI runs in its thread pool; generations then queue on the model lock (see serving.model).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraflow.serving.model import NotReady
from loraflow.serving.service import BadRequest, Service

MAX_STOP = 4  # as OpenAI


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completions request this server honours; anything else is refused
    by name rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = None
    model: str | None = None  # accepted for OpenAI clients; the alias being followed decides
    n: Literal[1] = 1
    stream: Literal[False] = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


def _describe_validation(errors) -> tuple[str, str | None]:
    parts, param = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON", None
        if err.get("type") == "model_attributes_type" or (not loc and err.get("type") in ("dict_type", "missing")):
            return "request body must be a JSON object", None
        field = ".".join(loc) or "body"
        param = param or field
        parts.append(f"{field}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def create_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="loraflow serve", version="1", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc.errors())
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind=kind)

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        if request.url.path != "/v1/completions":
            return await call_next(request)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            service.metrics.observe(500, time.perf_counter() - started)
            raise
        service.metrics.observe(response.status_code, time.perf_counter() - started)
        return response

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        try:
            return service.complete(body.prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                                    top_p=body.top_p, stop=body.stop or [])
        except BadRequest as exc:
            param = str(exc).split(":", 1)[0] if str(exc).startswith(("max_tokens", "prompt")) else None
            return _error(400, str(exc), param)
        except NotReady as exc:
            return _error(503, str(exc), kind="unavailable")

    @app.get("/v1/models")
    def models():
        info = service.describe()
        data = []
        if info["version"]:
            data.append({"id": info["model"], "object": "model", "owned_by": "loraflow",
                         "root": (info["base_model"] or {}).get("id"), "alias": f"{service.name}@{service.alias}"})
        return {"object": "list", "data": data}

    @app.get("/v1/adapter")
    def adapter():
        return service.describe()

    @app.get("/health")
    def health():
        info = service.describe()
        if not info["version"]:
            return JSONResponse(status_code=503, content={"status": "loading", "error": info["last_swap_error"]})
        return {"status": "ok", "model": info["model"]}

    @app.get("/metrics")
    def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return app
