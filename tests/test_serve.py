"""`loraflow serve NAME@ALIAS` as a real process on a real S3 server (rclone), driven by real HTTP
clients: bad requests get 400 naming the field; an alias move under concurrent load is served
with no failed request; versions that fail to load or fail the canary (NaN weights, a perplexity
far above the recorded one) never get traffic; a store outage does not interrupt serving, and a rollback after
it is picked up."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import wait_for as _wait_for
from fixtures_s3 import make_adapter_dir, registry_env

pytestmark = pytest.mark.slow

POLL_S = 0.2


def wait_for(predicate, timeout: float = 60.0, step: float = 0.05):
    return _wait_for(predicate, timeout, step)


def canary_ppl(model_dir: Path, adapter_dir: Path) -> float:
    """The adapter's perplexity on the canary's built-in documents: what an evaluation on those
    documents would have recorded in the manifest."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.serving.canary import DEFAULT_DOCUMENTS

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    nll = count = 0
    with torch.no_grad():
        for doc in DEFAULT_DOCUMENTS:
            ids = tok(doc, return_tensors="pt")["input_ids"]
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def nan_adapter(src: Path, dest: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("README.md"))
    tensors = load_file(str(dest / "adapter_model.safetensors"))
    first_b = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first_b] = tensors[first_b] * float("nan")
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


def overconfident_adapter(model_dir: Path, dest: Path) -> Path:
    """LoRA on the output head with large weights: finite logits, wildly wrong confident predictions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], task_type="CAUSAL_LM",
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lm_head" in name and "lora_B" in name:
                param.mul_(50)
    model.save_pretrained(dest, save_embedding_layers=False)
    return dest


def write_unchecked(settings, name: str, adapter_dir: Path, metrics: dict) -> str:
    """A version written by another tool than `loraflow publish` (no weight check): files, then
    the manifest that makes it exist."""
    import json as _json

    from loraflow.registry.layout import Layout, new_version
    from loraflow.registry.manifest import build_manifest
    from loraflow.storage.store import Store
    from loraflow.storage.transfer import local_files, upload_files

    store, layout, version = Store(settings.storage), Layout.for_name(settings.storage, name), new_version()
    (adapter_dir / "metrics.json").write_text(_json.dumps(metrics))
    entries = upload_files(store, local_files(adapter_dir, "adapter"), layout.version_prefix(version), "adapter")
    config = _json.loads((adapter_dir / "adapter_config.json").read_text())
    store.put_json(layout.manifest_key(version), build_manifest(
        name=name, version=version, files=[e.to_dict() for e in entries], adapter_config=config, metrics=metrics,
        snapshot={}, base_model=None, extra=None))
    return version


class Served:
    """One `loraflow serve` process and the store it follows, shared by the tests of this module
    (in file order: the outage test stops and restarts the store)."""

    def __init__(self, tmp: Path, model_dir: Path, adapter_dir: Path) -> None:
        from loraflow.demo.s3server import LocalS3Server, free_port
        from loraflow.registry import publish_adapter
        from loraflow.settings import load_settings

        self.tmp = tmp
        self.addr = f"127.0.0.1:{free_port()}"
        self.keys = {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
        self.store = LocalS3Server(tmp / "s3", self.addr, buckets=("serve",), **self.keys).start()
        self.settings = load_settings(storage=self.store.storage_overrides("serve"))
        second = make_adapter_dir(tmp / "adapter-2", model_dir, seed=1)
        recorded = {"adapter_ppl": canary_ppl(model_dir, adapter_dir)}

        def publish(path, aliases=()):
            return publish_adapter(self.settings, path, name="srv", aliases=list(aliases), evaluation=recorded).version

        self.v1 = publish(adapter_dir, ["champion"])
        self.v2 = publish(second)
        # Publish refuses NaN weights; the canary still guards versions written by anything else.
        self.v_nan = write_unchecked(self.settings, "srv", nan_adapter(adapter_dir, tmp / "adapter-nan"), recorded)
        self.v_wild = publish(overconfident_adapter(model_dir, tmp / "adapter-wild"))
        broken = make_adapter_dir(tmp / "adapter-broken", model_dir, r=8, seed=4)
        shutil.copy(adapter_dir / "adapter_config.json", broken / "adapter_config.json")  # says r=4
        self.v_broken = publish(broken)

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        env = registry_env(self.store, "serve", LORAFLOW_HOME=str(tmp / "home"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraflow.cli", "serve", "srv@champion", "--port", str(self.port),
             "--poll-interval", str(POLL_S)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        if not wait_for(self.healthy, timeout=180, step=0.25):
            self.stop()
            pytest.fail(f"the server never became healthy:\n{(tmp / 'serve.log').read_text()[-3000:]}")

    def healthy(self) -> bool:
        import httpx

        if self.proc.poll() is not None:
            return False
        try:
            return self.http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def adapter(self) -> dict:
        return self.http.get("/v1/adapter").json()

    def complete(self, **body):
        return self.http.post("/v1/completions", json={"prompt": "The movie was", "max_tokens": 4,
                                                       "temperature": 0, **body})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.http.close()
        self.log.close()
        self.store.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    service = Served(tmp_path_factory.mktemp("serve"), tiny_model_dir, tiny_adapter_dir)
    yield service
    service.stop()


def test_endpoints_describe_the_served_version(served):
    r = served.complete(prompt="I loved this film because", max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == f"srv=={served.v1}" and body["object"] == "text_completion"
    assert len(body["choices"]) == 1 and 1 <= body["usage"]["completion_tokens"] <= 5
    assert body["choices"][0]["finish_reason"] in ("length", "stop")

    info = served.adapter()
    assert (info["name"], info["alias"], info["version"]) == ("srv", "champion", served.v1)
    assert info["base_model"]["id"] and info["loaded_at"] and info["last_swap_error"] is None
    assert info["last_canary"]["ok"] and info["last_canary"]["recorded_ppl"] > 0
    models = served.http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [f"srv=={served.v1}"]

    metrics = served.http.get("/metrics").text
    assert f'loraflow_serve_adapter_info{{alias="champion",name="srv",version="{served.v1}"}} 1.0' in metrics
    assert 'loraflow_serve_requests_total{status="200"}' in metrics
    assert "loraflow_serve_queue_depth 0.0" in metrics


@pytest.mark.parametrize(("body", "message"), [
    ({"max_tokens": 4}, "prompt: Field required"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens: 1000000 exceeds this server's limit of 512"),
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": 42}, "prompt: Input should be a string or a list of strings (token-id prompts are not supported)"),
    ({"prompt": "hi", "temperature": 7}, "temperature: Input should be less than or equal to 2"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop: Value error, at most 4 stop sequences"),
    ({"prompt": "hi", "n": 2}, "n: only 1 is supported; send 1 or null or leave it out"),
    ({"prompt": "hi", "best_of": 3}, "best_of: only 1 is supported; send 1 or null or leave it out"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty: penalties are not supported; send 0 or null or leave it out"),
    (["hi"], "request body must be a JSON object"),
    (b"{not json", "request body is not valid JSON"),
])
def test_bad_requests_get_400_naming_the_field(served, body, message):
    if isinstance(body, bytes):
        r = served.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] == message and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_too_long_for_the_context_and_unknown_paths(served):
    r = served.complete(prompt="word " * 1030, max_tokens=8)
    assert r.status_code == 400 and "exceeds the model's context of 1024 tokens" in r.json()["error"]["message"]
    assert served.http.get("/v2/nothing").status_code == 404
    assert served.complete().status_code == 200  # none of that hurt the server


def test_openai_clients_requests_are_served(served):
    """What LangChain's OpenAI wrapper sends on every request (a batch of prompts, neutral
    penalties, logprobs null, logit_bias {}, n 1, seed, user), answered one choice per prompt."""
    body = {"model": "srv", "prompt": ["The movie was", "I think that"], "temperature": 0.7, "top_p": 1,
            "frequency_penalty": 0, "presence_penalty": 0, "n": 1, "logit_bias": {}, "seed": 7, "logprobs": None,
            "max_tokens": 3, "user": "someone", "echo": False, "suffix": None, "best_of": 1, "stream": False}
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1] and answer["usage"]["completion_tokens"] <= 6
    again = served.http.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in answer["choices"]]  # seeded


def test_swap_under_concurrent_load_fails_no_request(served):
    from loraflow.registry import set_alias

    results: dict[int, list[tuple[int, str | None]]] = {i: [] for i in range(4)}
    stop = threading.Event()

    def client(i: int) -> None:
        import httpx

        with httpx.Client(base_url=served.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/completions", json={"prompt": f"Review {i}: the plot", "max_tokens": 6,
                                                           "temperature": 0.8, "top_p": 0.9})
                    results[i].append((r.status_code, r.json().get("model")))
                except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                    results[i].append((0, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: all(len(r) >= 3 for r in results.values()))
        set_alias(served.settings, "srv", "champion", served.v2)
        new = f"srv=={served.v2}"
        assert wait_for(lambda: all(sum(m == new for _, m in r) >= 3 for r in results.values()), timeout=90)
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    answers = [a for r in results.values() for a in r]
    assert [a for a in answers if a[0] != 200] == []
    old = f"srv=={served.v1}"
    assert {m for _, m in answers} == {old, new}
    for r in results.values():
        models = [m for _, m in r]
        first_new = models.index(new)
        assert old not in models[first_new:]  # once switched, a client never goes back
    info = served.adapter()
    assert info["version"] == served.v2 and info["swaps"] == 1 and info["last_swap"]["from"] == served.v1
    assert wait_for(lambda: served.adapter()["loaded_versions"] == [served.v2])  # the old one unloaded


@pytest.mark.parametrize(("bad", "reason", "result"), [
    ("v_nan", "canary failed: non-finite logits", "canary_failed"),
    ("v_wild", "canary failed: perplexity", "canary_failed"),
    ("v_broken", "size mismatch", "load_failed"),  # weights of another rank than its config says
])
def test_failed_canary_or_load_keeps_the_current_version(served, bad, reason, result):
    from loraflow.registry import set_alias

    current = served.adapter()["version"]
    bad_version = getattr(served, bad)
    set_alias(served.settings, "srv", "champion", bad_version)
    assert wait_for(lambda: (served.adapter()["last_swap_error"] or {}).get("version") == bad_version)
    info = served.adapter()
    assert reason in info["last_swap_error"]["error"] and info["last_swap_error"]["result"] == result
    assert info["version"] == current and info["loaded_versions"] == [current]
    r = served.complete()
    assert r.status_code == 200 and r.json()["model"] == f"srv=={current}"
    metrics = served.http.get("/metrics").text
    assert f'loraflow_serve_swaps_total{{result="{result}"}}' in metrics
    log = (served.tmp / "serve.log").read_text()
    assert f"not serving srv=={bad_version}: " in log


def test_store_outage_keeps_serving_and_a_rollback_after_it_is_served(served):
    from loraflow.demo.s3server import LocalS3Server
    from loraflow.registry import set_alias

    current = served.adapter()["version"]
    served.store.stop()
    try:
        assert wait_for(lambda: served.adapter()["storage_error"] is not None, timeout=60)
        assert "cannot reach the storage endpoint" in served.adapter()["storage_error"]
        for _ in range(3):
            r = served.complete()
            assert r.status_code == 200 and r.json()["model"] == f"srv=={current}"
        assert served.http.get("/health").status_code == 200
    finally:
        served.store = LocalS3Server(served.tmp / "s3", served.addr, buckets=("serve",), **served.keys).start()
    set_alias(served.settings, "srv", "champion", served.v1)  # rollback
    # The error clears once the poll that found the move has finished (after the swap).
    assert wait_for(lambda: served.adapter()["version"] == served.v1 and served.adapter()["storage_error"] is None,
                    timeout=60)
    assert served.complete().json()["model"] == f"srv=={served.v1}"
    log = (served.tmp / "serve.log").read_text()
    assert log.count("cannot reach the storage endpoint") == 1  # one line for the whole outage


def test_model_lock_serves_requests_in_order_and_swap_work_first():
    """Why a move is served after the generation running now rather than after the whole queue."""
    from loraflow.serving.model import ModelLock

    lock = ModelLock()
    order: list[str] = []

    def take(name: str, urgent: bool = False) -> None:
        with lock.hold(urgent=urgent):
            order.append(name)

    threads = []
    with lock.hold():  # a generation running now
        for name, urgent in (("request-0", False), ("request-1", False), ("request-2", False), ("canary", True)):
            threads.append(threading.Thread(target=take, args=(name, urgent)))
            threads[-1].start()
            assert wait_for(lambda n=len(threads): lock.waiting == n, timeout=5)
    for t in threads:
        t.join(5)
    assert order == ["canary", "request-0", "request-1", "request-2"]


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "srv"], "'srv': serve an alias, NAME@ALIAS"),
    (["serve"], "serve: name at least one adapter"),
    (["serve", "srv@champion", "--max-batch", "0"], "--max-batch 0: must be >= 1"),
    (["serve", "srv@champion", "srv@champion"], "'srv@champion': listed twice"),
    (["serve", "--adapters-file", "/nonexistent/refs.txt"], "--adapters-file /nonexistent/refs.txt:"),
    (["serve", "srv@champion", "--port", "70000"], "--port 70000: expected 0-65535"),
    (["serve", "srv@champion", "--poll-interval", "0"], "--poll-interval 0.0: must be positive"),
    (["serve", "srv@champion", "--canary-docs", "/nonexistent/docs.txt"], "--canary-docs /nonexistent/docs.txt:"),
    (["serve", "bad name@champion"], "invalid adapter name 'bad name'"),
])
def test_serve_usage_errors_are_one_line_exit_2(cli, argv, message):
    code, _, stderr = cli(*argv)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
