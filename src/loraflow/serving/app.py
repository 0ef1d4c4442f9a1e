"""The HTTP face of a `Service`: OpenAI-style `/v1/completions`, `/v1/chat/completions`,
`/v1/models`, `/v1/adapter`, `/health` and `/metrics`.

Requests are read as OpenAI clients send them (LangChain, the openai package, curl): every standard
field is accepted with its neutral value (`presence_penalty: 0`, `frequency_penalty: 0`,
`logprobs: null`, `logit_bias: {}`, `n: 1`, `best_of: 1`, `echo: false`, `suffix: null`, `user`,
null for any of them) and a completions prompt may be a list of strings (one choice per prompt, as
OpenAI answers a batch). A value that would change the output in a way this server does not
implement (a penalty, logprobs, n > 1, tools) is refused by name, as is a field OpenAI does not
define; `seed` is honoured when sampling. `stream: true` answers with server-sent events
(`data: {chunk}` ... `data: [DONE]`), with a usage chunk when `stream_options.include_usage`.

`model` chooses the adapter: `NAME`, `NAME@ALIAS` or `NAME==VERSION`; one this server does not
serve is a 404 `model_not_found`. Every answer names what generated it: `model` is
`NAME==VERSION`, `system_fingerprint` is `sha256:<manifest sha256>`, and the headers
`x-loraflow-adapter-version` / `x-loraflow-adapter-sha256` say the same (before the first byte of
a stream).

Every error, on every route (FastAPI's own 404, 405 and validation errors included), is OpenAI's
error shape, `{"error": {"message", "type", "param", "code"}}`: 400 with the field named in
`param` and the message (`max_tokens: Input should be greater than or equal to 1`), 404/405 for
unknown routes, methods and models, 503 before a version is loaded, 500 for a crash.
Handlers are plain functions, which FastAPI runs in its thread pool; each waits for its sequences,
which the one generation loop (serving.scheduler) runs batched with every other request's.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraflow.log import get_logger
from loraflow.serving.model import NotReady
from loraflow.serving.scheduler import GenerationFailed
from loraflow.serving.service import BadRequest, ModelNotFound, Service, identity

log = get_logger("serving")

MAX_STOP = 4  # as OpenAI
MAX_PROMPTS = 16  # prompts in one request; they are generated together, batched


class Unsupported(ValueError):
    """A standard field set to a value this server would have to implement to honour."""


# Standard fields this server honours only at their neutral value: (the neutral values, why not others).
NEUTRAL = {
    "n": ((1,), "only 1 is supported"),
    "best_of": ((1,), "only 1 is supported"),
    "logprobs": ((), "log probabilities are not supported"),
    "echo": ((False,), "echoing the prompt is not supported"),
    "suffix": (("",), "insertion (a suffix) is not supported"),
    "presence_penalty": ((0,), "penalties are not supported"),
    "frequency_penalty": ((0,), "penalties are not supported"),
    "logit_bias": (({},), "logit biases are not supported"),
    "tools": (([],), "tools are not supported"),
    "tool_choice": (("none",), "tools are not supported"),
    "functions": (([],), "functions are not supported"),
    "top_logprobs": ((0,), "log probabilities are not supported"),
}
CHAT_NEUTRAL = {**{k: v for k, v in NEUTRAL.items() if k not in ("best_of", "echo", "suffix", "logprobs")},
                "logprobs": ((False,), "log probabilities are not supported")}


def _is_neutral(value, neutral: tuple) -> bool:
    # `is` for booleans: 0 == False and 1 == True must not pass for each other.
    return value is None or any(value is n if isinstance(n, bool) or isinstance(value, bool) else value == n
                                for n in neutral)


def _stops(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if len(value) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(not s for s in value):
        raise ValueError("stop sequences must not be empty")
    return value


def _json(value) -> str:
    import json

    return json.dumps(value)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # the openai client may send it; nothing to obfuscate here


class _SamplingRequest(BaseModel):
    """What OpenAI's completions and chat completions requests share. Fields this server cannot
    honour beyond their neutral value are accepted with it and refused otherwise (each request's
    `_neutral_only`); unknown fields are refused by name, as OpenAI does, rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # NAME, NAME@ALIAS or NAME==VERSION (may be left out when one adapter is served)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return _stops(value)


class CompletionRequest(_SamplingRequest):
    """OpenAI's completions request."""

    prompt: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]]
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return value

    @field_validator(*(k for k in NEUTRAL if k not in ("tools", "tool_choice", "functions", "top_logprobs")))
    @classmethod
    def _neutral_only(cls, value, info):
        return _neutral(NEUTRAL, value, info.field_name)


def _neutral(table: dict, value, field: str):
    neutral, why = table[field]
    if _is_neutral(value, neutral):
        return value
    allowed = " or ".join([*map(_json, neutral), "null"])
    raise Unsupported(f"{why}; send {allowed} or leave it out")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        # The templates of open models know system, user and assistant; OpenAI's "developer" is a system turn.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    """OpenAI's chat completions request."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict | None = None

    @field_validator(*CHAT_NEUTRAL)
    @classmethod
    def _neutral_only(cls, value, info):
        return _neutral(CHAT_NEUTRAL, value, info.field_name)

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is None or value == {"type": "text"}:
            return value
        raise Unsupported('only plain text answers are supported; send {"type": "text"} or leave it out')


# FastAPI's status codes and the error `type`/`code` OpenAI's clients expect for them.
_KINDS = {400: ("invalid_request_error", "invalid_value"), 404: ("invalid_request_error", "unknown_url"),
          405: ("invalid_request_error", "method_not_allowed"), 413: ("invalid_request_error", "too_large"),
          415: ("invalid_request_error", "unsupported_media_type"), 500: ("server_error", "internal_error"),
          503: ("server_error", "model_not_ready")}
IDENTITY_HEADERS = ("x-loraflow-adapter-version", "x-loraflow-adapter-sha256")


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
        if field in ("messages", "stream_options"):  # nested models: name the inner field too
            field = ".".join([field, *[q for q in loc[1:] if not q.isdigit()][:1]])
        if param == field:
            continue
        param = param or field
        msg = err.get("msg", "")
        if err.get("type") == "extra_forbidden":
            msg, code = "not a parameter of OpenAI's API (or not one this server knows)", "unknown_parameter"
        elif isinstance((err.get("ctx") or {}).get("error"), Unsupported):
            msg, code = str(err["ctx"]["error"]), "unsupported_value"
        elif field == "prompt" and err.get("type") in ("string_type", "list_type"):
            msg = "Input should be a string or a list of strings (token-id prompts are not supported)"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request", param, code


def _headers(entry) -> dict:
    return dict(zip(IDENTITY_HEADERS, (entry.version, entry.sha256)))


def _sse(payload) -> str:
    import json

    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _stream(service: Service, entry, sequences, *, chat: bool, include_usage: bool):
    """OpenAI's stream: one chunk per piece of text, a last chunk per choice with its
    finish_reason, the usage chunk when asked, then [DONE]. Choices come one after the other
    (their sequences generate together; each one's text waits in its queue)."""
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": entry.model_id, "system_fingerprint": identity(entry)}

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    done = 0
    try:
        for index, seq in enumerate(sequences):
            if chat:
                yield _sse(chunk(index, "", None, first=True))
            for kind, value in seq.events():
                if kind == "text":
                    yield _sse(chunk(index, value, None))
                else:
                    yield _sse(chunk(index, None, value))
            done += 1
        tokens = sum(seq.completion_tokens for seq in sequences)
        service.metrics.tokens.inc(tokens)
        if include_usage:
            prompt = sum(len(seq.prompt_ids) for seq in sequences)
            yield _sse({**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": tokens,
                                                         "total_tokens": prompt + tokens}})
        yield _sse("[DONE]")
    except GenerationFailed as exc:
        yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": "internal_error"}})
    finally:
        for seq in sequences[done:]:
            seq.cancelled = True  # the client went away: their rows leave the batch at the next step


def create_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="loraflow serve", version="1", docs_url=None, redoc_url=None)
    app.state.service = service
    generating = ("/v1/completions", "/v1/chat/completions")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param, code = _describe_validation(exc.errors())
        return _error(400, message, param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path} (this server has /v1/completions, "
                       "/v1/chat/completions, /v1/models)")
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        if request.url.path not in generating:
            return await call_next(request)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            service.metrics.observe(500, time.perf_counter() - started)
            raise
        service.metrics.observe(response.status_code, time.perf_counter() - started)
        return response

    def answer(model, prompts, body, *, chat: bool, max_tokens: int | None):
        try:
            options = dict(max_tokens=16 if max_tokens is None else max_tokens,
                           temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop or [], seed=body.seed)
            if body.stream:
                entry, sequences = service.start_generation(model, prompts, **options)
                usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_stream(service, entry, sequences, chat=chat, include_usage=usage),
                                         media_type="text/event-stream",
                                         headers={**_headers(entry), "cache-control": "no-cache"})
            entry, content = service.complete_all(prompts, model=model, chat=chat, **options)
            return JSONResponse(content, headers=_headers(entry))
        except (BadRequest, ModelNotFound, NotReady, GenerationFailed) as exc:
            return _service_error(exc)

    def _service_error(exc: Exception):
        """The service's refusals as OpenAI errors: one mapping for every route."""
        if isinstance(exc, BadRequest):
            return _error(400, str(exc), exc.param)
        if isinstance(exc, ModelNotFound):
            return _error(404, str(exc), "model", code="model_not_found")
        if isinstance(exc, NotReady):
            return _error(503, str(exc))
        return _error(500, str(exc))

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return answer(body.model, prompts, body, chat=False, max_tokens=body.max_tokens)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest):
        try:
            prompt = service.chat_prompt(body.model, [m.plain() for m in body.messages])
        except (BadRequest, ModelNotFound, NotReady) as exc:
            return _service_error(exc)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return answer(body.model, [prompt], body, chat=True, max_tokens=limit)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": service.models()}

    @app.get("/v1/adapter")
    def adapter():
        return service.describe()

    @app.get("/health")
    def health():
        if not service.ready:
            errors = [r.last_swap_error for r in service.routes if r.last_swap_error]
            reason = f": {errors[0]['error']}" if errors else ""
            return JSONResponse(status_code=503, content={
                "status": "loading", "last_swap_error": errors[0] if errors else None,
                "error": {"message": f"no version loaded yet{reason}", "type": "server_error", "param": None,
                          "code": "model_not_ready"}})
        info = service.describe()
        return {"status": "ok", "model": info["model"], "models": [m["id"] for m in service.models()]}

    @app.get("/metrics")
    def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return app
