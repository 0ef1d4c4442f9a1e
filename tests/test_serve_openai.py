"""The service reads requests as OpenAI clients send them and answers every error, on every route,
in OpenAI's error shape. The app is served in-process over a Service with no version loaded yet, so
a request that passes validation is answered 503 (model_not_ready) without loading a model; the
generation itself is covered by test_serve.py."""

from __future__ import annotations

import pytest

# What common clients send on every request with neutral values (LangChain's OpenAI wrapper: a
# list of prompts, both penalties 0, logprobs null, logit_bias {}, n 1, seed null, best_of 1).
LANGCHAIN = {"model": "srv", "prompt": ["The movie was"], "temperature": 0.7, "top_p": 1, "frequency_penalty": 0,
             "presence_penalty": 0, "n": 1, "logit_bias": {}, "seed": None, "logprobs": None, "max_tokens": 256}
OPENAI_PY = {"model": "srv", "prompt": "hi", "echo": False, "suffix": None, "best_of": 1, "stream": False,
             "stream_options": None, "user": "user-1", "stop": None, "frequency_penalty": 0.0,
             "presence_penalty": 0.0, "max_tokens": None, "temperature": None, "top_p": None}


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from loraflow.serving.app import create_app
    from loraflow.serving.service import Service
    from loraflow.settings import load_settings

    service = Service("srv@champion", load_settings(storage={"endpoint_url": "http://127.0.0.1:9", "bucket": "srv"}))
    with TestClient(create_app(service), raise_server_exceptions=False) as test_client:
        yield test_client


def _shape(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code:
        assert error["code"] == code, error
    if param:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("body", [LANGCHAIN, OPENAI_PY, {"prompt": "hi", "n": None, "logprobs": None, "user": None},
                                  {"prompt": ["a", "b", "c"], "echo": None, "logit_bias": None, "seed": 3}])
def test_neutral_values_of_standard_fields_are_accepted(client, body):
    _shape(client.post("/v1/completions", json=body), 503, "model_not_ready")  # past validation


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logprobs", 0), ("logprobs", 5), ("n", 2),
    ("best_of", 2), ("echo", True), ("suffix", "end"), ("logit_bias", {"50256": -100}),
])
def test_values_that_would_change_the_output_are_refused_by_name(client, field, value):
    error = _shape(client.post("/v1/completions", json={"prompt": "hi", field: value}), 400, "unsupported_value",
                   field)
    assert error["message"].startswith(f"{field}: ") and "leave it out" in error["message"]


@pytest.mark.parametrize(("body", "code", "param", "message"), [
    ({"prompt": "hi", "functions": []}, "unknown_parameter", "functions", "functions: not a parameter"),
    ({"prompt": [1, 2, 3]}, "invalid_value", "prompt", "token-id prompts are not supported"),
    ({"prompt": ["x"] * 17}, "invalid_value", "prompt", "at most 16 prompts"),
    ({"prompt": "hi", "max_tokens": 0}, "invalid_value", "max_tokens", "greater than or equal to 1"),
])
def test_invalid_requests_name_the_field(client, body, code, param, message):
    assert message in _shape(client.post("/v1/completions", json=body), 400, code, param)["message"]


def test_every_route_answers_errors_in_openai_shape(client):
    assert "GET /v1/nothing" in _shape(client.get("/v1/nothing"), 404, "unknown_url")["message"]
    r = client.get("/v1/completions")
    assert _shape(r, 405, "method_not_allowed") and r.headers["allow"] == "POST"
    _shape(client.delete("/v1/models"), 405, "method_not_allowed")
    _shape(client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400,
           "invalid_json")
    _shape(client.post("/v1/completions", json=["hi"]), 400, "invalid_json")
    _shape(client.get("/health"), 503, "model_not_ready")


@pytest.mark.parametrize(("body", "status", "code", "param", "message"), [
    ({"messages": []}, 400, "invalid_value", "messages", "messages: List should have at least 1 item"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages.role", "messages.role: "),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "unsupported_value",
     "tools", "tools: tools are not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "unsupported_value", "logprobs",
     "logprobs: log probabilities are not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
     "unsupported_value", "response_format", "only plain text answers"),
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found", "model",
     "model 'other' is not served here"),
    ({"model": "other", "prompt": "hi"}, 404, "model_not_found", "model", "model 'other' is not served here"),
])
def test_chat_and_model_errors_in_openai_shape(client, body, status, code, param, message):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert message in _shape(client.post(route, json=body), status, code, param)["message"]
