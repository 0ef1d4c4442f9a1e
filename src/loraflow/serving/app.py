"""The HTTP face of a `Service`: OpenAI-style `/v1/completions`, `/v1/models`, `/v1/adapter`,
`/health` and `/metrics`.

Requests are read as OpenAI clients send them (LangChain, the openai package, curl): every standard
field of the completions API is accepted with its neutral value (`presence_penalty: 0`,
`frequency_penalty: 0`, `logprobs: null`, `logit_bias: {}`, `n: 1`, `best_of: 1`, `echo: false`,
`suffix: null`, `stream: false`, `user`, null for any of them) and a prompt may be a list of
strings (one choice per prompt, as OpenAI answers a batch). A value that would change the output in
a way this server does not implement (a penalty, logprobs, n > 1, streaming) is refused by name, as
is a field OpenAI does not define; `seed` is honoured when sampling.

Every error, on every route (FastAPI's own 404, 405 and validation errors included), is OpenAI's
error shape, `{"error": {"message", "type", "param", "code"}}`: 400 with the field named in
`param` and the message (`max_tokens: Input should be greater than or equal to 1`), 404/405 for
unknown routes and methods, 503 before the first version is loaded, 500 for a crash.
Handlers are plain functions, which FastAPI runs in its thread pool; generations then queue on the
model lock (see serving.model).
"""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraflow.log import get_logger
from loraflow.serving.model import NotReady
from loraflow.serving.service import BadRequest, Service

log = get_logger("serving")

MAX_STOP = 4  # as OpenAI
MAX_PROMPTS = 16  # prompts in one request; each is generated in turn under the model lock


class Unsupported(ValueError):
    """A standard field set to a value this server would have to implement to honour."""


# Standard fields this server honours only at their neutral value: (the neutral values, why not others).
NEUTRAL = {
    "n": ((1,), "only 1 is supported"),
    "best_of": ((1,), "only 1 is supported"),
    "stream": ((False,), "streaming is not supported"),
    "stream_options": ((), "only applies to streaming, which is not supported"),
    "logprobs": ((), "log probabilities are not supported"),
    "echo": ((False,), "echoing the prompt is not supported"),
    "suffix": (("",), "insertion (a suffix) is not supported"),
    "presence_penalty": ((0,), "penalties are not supported"),
    "frequency_penalty": ((0,), "penalties are not supported"),
    "logit_bias": (({},), "logit biases are not supported"),
}


def _is_neutral(value, neutral: tuple) -> bool:
    # `is` for booleans: 0 == False and 1 == True must not pass for each other.
    return value is None or any(value is n if isinstance(n, bool) or isinstance(value, bool) else value == n
                                for n in neutral)


def _json(value) -> str:
    import json

    return json.dumps(value)


class CompletionRequest(BaseModel):
    """OpenAI's completions request. Fields this server cannot honour beyond their neutral value
    are accepted with it and refused otherwise; unknown fields are refused by name, as OpenAI does,
    rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    model: str | None = None  # accepted for OpenAI clients; the alias being followed decides
    seed: int | None = None
    user: str | None = None
    n: int | None = None
    best_of: int | None = None
    stream: bool | None = None
    stream_options: dict | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return value

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

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral_only(cls, value, info):
        neutral, why = NEUTRAL[info.field_name]
        if _is_neutral(value, neutral):
            return value
        allowed = " or ".join([*map(_json, neutral), "null"])
        raise Unsupported(f"{why}; send {allowed} or leave it out")


# FastAPI's status codes and the error `type`/`code` OpenAI's clients expect for them.
_KINDS = {400: ("invalid_request_error", "invalid_value"), 404: ("invalid_request_error", "unknown_url"),
          405: ("invalid_request_error", "method_not_allowed"), 413: ("invalid_request_error", "too_large"),
          415: ("invalid_request_error", "unsupported_media_type"), 500: ("server_error", "internal_error"),
          503: ("server_error", "model_not_ready")}


def _error(status: int, message: str, param: str | None = None, kind: str | None = None, code: str | None = None,
           headers: dict | None = None):
    from fastapi.responses import JSONResponse

    default_kind, default_code = _KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error",
                                                     None))
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind or default_kind, "param": param,
                                           "code": code or default_code}})


def _describe_validation(errors) -> tuple[str, str | None, str]:
    parts, param, code = [], None, "invalid_value"
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON", None, "invalid_json"
        if err.get("type") == "model_attributes_type" or (not loc and err.get("type") in ("dict_type", "missing")):
            return "request body must be a JSON object", None, "invalid_json"
        # A union (str | list[str]) reports each branch; the field's name and first reason suffice.
        field = loc[0] if loc else "body"
        if param == field:
            continue
        param = param or field
        msg = err.get("msg", "")
        if err.get("type") == "extra_forbidden":
            msg, code = "not a parameter of OpenAI's completions API (or not one this server knows)", "unknown_parameter"
        elif isinstance((err.get("ctx") or {}).get("error"), Unsupported):
            msg, code = str(err["ctx"]["error"]), "unsupported_value"
        elif field == "prompt" and err.get("type") in ("string_type", "list_type"):
            msg = "Input should be a string or a list of strings (token-id prompts are not supported)"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request", param, code


def create_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="loraflow serve", version="1", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param, code = _describe_validation(exc.errors())
        return _error(400, message, param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (this server has /v1/completions, /v1/models)"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

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
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        try:
            return service.complete_all(
                prompts, max_tokens=16 if body.max_tokens is None else body.max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop or [], seed=body.seed)
        except BadRequest as exc:
            param = str(exc).split(":", 1)[0] if str(exc).startswith(("max_tokens", "prompt")) else None
            return _error(400, str(exc), param)
        except NotReady as exc:
            return _error(503, str(exc))

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
            swap = info["last_swap_error"]
            reason = f": {swap['error']}" if swap else ""
            return JSONResponse(status_code=503, content={
                "status": "loading", "last_swap_error": swap,
                "error": {"message": f"no version loaded yet{reason}", "type": "server_error", "param": None,
                          "code": "model_not_ready"}})
        return {"status": "ok", "model": info["model"]}

    @app.get("/metrics")
    def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return app
