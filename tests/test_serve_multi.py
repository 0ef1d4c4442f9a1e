"""Several adapters of one base in one `loraflow serve`: the batched generation loop gives every
request the tokens it gets alone (GPT-2's Conv1D and Llama's Linear LoRA layers), a request's
`model` picks the adapter and every answer names the exact version and its sha256, the stock
`openai` client streams, chat needs a chat template, the LRU bound evicts and reloads, and aliases
moving under batched load fail no request.

The service runs in this process (uvicorn in a thread, real HTTP) over a real S3 server (rclone)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from conftest import wait_for
from fixtures_s3 import create_bucket, make_adapter_dir, s3_settings_for

pytestmark = pytest.mark.slow

PROMPTS = ["The movie was", "I did not like this film at all, because the plot", "Hi", "A long and slow story about"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_llama_dir(dest: Path) -> Path:
    """A random 2-layer Llama (SmolLM2's architecture: q/k/v/o Linear projections, grouped KV heads)
    with the GPT-2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.demo.tiny_models import gpt2_tokenizer

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def lora_dir(dest: Path, base: Path, targets: list[str], *, r: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mixed_adapter_batch_equals_each_request_alone(tmp_path, tiny_model_dir, arch):
    """Requests of three adapters (different ranks) and the base join the running batch at
    different steps, with prompts of different lengths (left padding): each one's greedy tokens
    equal its tokens alone through the same serving path, and plain PEFT `generate`'s."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.serving.model import Loaded, ModelHolder
    from loraflow.serving.scheduler import Sampling, Scheduler, Sequence, serving_greedy

    base = tiny_model_dir if arch == "gpt2" else tiny_llama_dir(tmp_path / "llama")
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapters = [lora_dir(tmp_path / f"a{i}", base, targets, r=r, seed=i) for i, r in enumerate((2, 4, 8))]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapters[0])).eval()
    holder = ModelHolder()
    holder.model, holder.tokenizer, holder.eos_ids = model, AutoTokenizer.from_pretrained(base), {50256}
    first = Loaded("default", "v0", {"name": "a0"}, adapters[0])
    holder.entries.append(first)
    entries = [first, *(holder.add(a, {"name": f"a{i}", "version": f"v{i}"}) for i, a in enumerate(adapters[1:], 1))]
    entries.append(Loaded("__base__", "base", {"name": "base"}, base))  # PEFT's name for "no adapter"

    jobs = [(p, e) for e in entries for p in PROMPTS]  # 16 sequences, 4 adapters (incl. the base)
    new_tokens = 10
    alone = {}
    with holder.lock.hold():
        for prompt, entry in jobs:
            alone[prompt, entry.slot] = serving_greedy(holder, entry, new_tokens)(holder.encode(prompt))
    for prompt, entry in jobs[:6]:  # plain PEFT, one prompt at a time, as a single request ran before
        ids = torch.tensor([holder.encode(prompt)])
        with torch.inference_mode():
            if entry.slot == "__base__":
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
            else:
                model.set_adapter(entry.slot)
                out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
        assert out[0, ids.shape[1]:].tolist() == alone[prompt, entry.slot], (prompt, entry.slot)

    scheduler = Scheduler(holder, max_batch=8).start()  # 16 jobs, 8 rows: later ones join as rows leave
    try:
        sequences = []
        with holder.lock.hold():  # all queued before the first step: it admits 8, the rest wait
            for i, (prompt, entry) in enumerate(jobs):
                holder.acquire(entry)
                # Different lengths: rows leave at different steps and waiting ones join then.
                sequences.append(scheduler.submit(Sequence(entry, holder.encode(prompt),
                                                           Sampling(max_tokens=new_tokens - i % 5), holder.decode)))
        for seq in sequences:
            seq.result()
    finally:
        scheduler.stop()
    for (prompt, entry), seq in zip(jobs, sequences):
        assert seq.generated == alone[prompt, entry.slot][:len(seq.generated)], (prompt, entry.slot)
        assert seq.finish_reason == "length" and len(seq.generated) == seq.sampling.max_tokens
    assert scheduler.peak_batch == 8 and len({e.slot for e in entries}) == 4
    assert all(e.in_flight == 0 for e in entries[:3])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_row_adapters_compute_what_peft_mixed_batches_compute(tmp_path, tiny_model_dir, precision):
    """serving.row_adapters (all of a batch's adapters in one product per layer) against PEFT's own
    mixed-adapter batch on the same rows: adapters of different ranks and scalings, one on a subset
    of the layers, and base rows; logits equal to rounding (fp32: 1e-5; bf16, autocast as served:
    PEFT's order and dtypes, so bit-equal here). A DoRA adapter in the batch sends the whole
    batch through PEFT's path (its logits are PEFT's exactly)."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.modeling import autocast, precision_of
    from loraflow.serving import row_adapters, scheduler

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16 if precision == "bf16" else None)
    a0 = lora_dir(tmp_path / "a0", tiny_model_dir, ["c_attn", "c_proj"], r=2, seed=0)
    model = PeftModel.from_pretrained(base, str(a0), adapter_name="a0").eval()
    model.load_adapter(str(lora_dir(tmp_path / "a1", tiny_model_dir, ["c_attn", "c_proj"], r=8, seed=1)), "a1")
    model.load_adapter(str(lora_dir(tmp_path / "a2", tiny_model_dir, ["c_attn"], r=4, seed=2)), "a2")
    torch.manual_seed(3)  # a DoRA adapter (PEFT's mixed batches refuse DoRA)
    model.add_adapter("d", LoraConfig(r=4, target_modules=["c_attn"], use_dora=True, init_lora_weights=False))
    for p in model.parameters():
        p.requires_grad_(False)
    if precision == "bf16":
        for name, p in model.named_parameters():
            if "lora" in name:
                p.data = p.data.float()  # peft's fp32 adapters beside a bf16 base, as the service loads them
    ids = torch.randint(0, 1000, (6, 7))
    names = ["a1", "a0", "__base__", "a2", "a1", "a2"]

    def peft(rows):
        with torch.inference_mode(), autocast(precision_of(model)):
            return model(input_ids=ids[:len(rows)], adapter_names=rows).logits.float()

    with torch.inference_mode(), autocast(precision_of(model)):  # as scheduler.forward calls it
        ours = row_adapters.forward(model, names, {"input_ids": ids})
    assert ours is not None  # this path, not PEFT's
    ours = ours.logits.float()
    layers = len(model.base_model.model.transformer.h)  # c_attn, attn.c_proj and mlp.c_proj are LoRA layers
    assert len([m for m in model.modules() if m._forward_hooks]) == 3 * layers
    theirs = peft(names)
    if precision == "fp32":
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(ours, theirs)
    # Each adapter changes its rows (the comparison above is not between two base models).
    with torch.inference_mode(), autocast(precision_of(model)), model.disable_adapter():
        plain = model(input_ids=ids).logits.float()
    assert all((ours[i] - plain[i]).abs().max() > 1e-3 for i, n in enumerate(names) if n != "__base__")
    assert torch.equal(ours[2], plain[2]) or precision == "fp32" and torch.allclose(ours[2], plain[2], atol=1e-5)
    # DoRA: not covered, so the batch goes to PEFT, which refuses mixed batches with DoRA in one line.
    assert row_adapters.forward(model, ["a1", "d"], {"input_ids": ids[:2]}) is None
    with pytest.raises(ValueError, match="DoRA"):
        scheduler.forward(model, input_ids=ids[:2], adapter_names=["a1", "d"])


class Served:
    """`loraflow serve`'s service and app in this process, on a real port, over a real S3 server."""

    def __init__(self, tmp: Path, server, settings, refs: list[str], **options) -> None:
        import uvicorn

        from loraflow.demo.s3server import free_port
        from loraflow.serving.app import create_app
        from loraflow.serving.service import ServeOptions, Service

        self.service = Service(refs, settings, ServeOptions(interval=0.2, dest=str(tmp / "cache"), **options))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.service.start()
        self.thread.start()

    def wait_ready(self, models: int) -> None:
        import httpx

        def ready():
            try:
                return len(httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]) == models
            except httpx.HTTPError:
                return False

        assert wait_for(ready, timeout=120, step=0.1), self.service.describe()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.service.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, s3_server, tiny_model_dir):
    """alpha (two versions), beta, gamma (pinned) on the tiny GPT-2; chatty on a copy of it whose
    tokenizer has a chat template (another base model)."""
    import shutil

    from transformers import AutoTokenizer

    from loraflow.registry import publish_adapter

    tmp = tmp_path_factory.mktemp("multi")
    settings = s3_settings_for(s3_server, create_bucket(s3_server))
    chat_base = tmp / "chat-base"
    shutil.copytree(tiny_model_dir, chat_base)
    tok = AutoTokenizer.from_pretrained(chat_base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat_base)

    def publish(name, base, seed, aliases=("champion",)):
        path = make_adapter_dir(tmp / f"{name}-{seed}", base, seed=seed)
        return publish_adapter(settings, path, name=name, aliases=list(aliases)).version

    versions = {"alpha": publish("alpha", tiny_model_dir, 1), "alpha2": publish("alpha", tiny_model_dir, 2, ()),
                "beta": publish("beta", tiny_model_dir, 3), "beta2": publish("beta", tiny_model_dir, 4, ()),
                "gamma": publish("gamma", tiny_model_dir, 5, ()), "chatty": publish("chatty", chat_base, 6)}
    return tmp, settings, versions


@pytest.fixture(scope="module")
def served(registry, s3_server):
    tmp, settings, versions = registry
    served = Served(tmp, s3_server, settings, ["alpha@champion", "beta@champion", f"gamma=={versions['gamma']}"])
    served.wait_ready(3)
    yield served
    served.stop()


def _sha(served, version: str) -> str:
    entry = next(e for e in served.service.holder.entries if e.version == version)
    return hashlib.sha256((entry.path / "manifest.json").read_bytes()).hexdigest()


def test_models_lists_each_adapter_with_version_sha256_and_base(served, registry):
    import httpx

    _, _, v = registry
    data = httpx.get(f"{served.url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == [f"alpha=={v['alpha']}", f"beta=={v['beta']}", f"gamma=={v['gamma']}"]
    assert [m["ref"] for m in data] == ["alpha@champion", "beta@champion", f"gamma=={v['gamma']}"]
    for m in data:
        assert m["sha256"] == _sha(served, m["version"]) and len(m["sha256"]) == 64
        assert m["base_model"]["id"] == m["root"] and m["root"]
    assert served.service.holder.loads == 3  # the base once, three adapters beside it


def test_model_picks_the_adapter_and_the_answer_names_version_and_sha256(served, registry):
    import httpx

    _, _, v = registry
    cases = {"alpha": v["alpha"], "alpha@champion": v["alpha"], f"alpha=={v['alpha']}": v["alpha"],
             "beta": v["beta"], f"gamma=={v['gamma']}": v["gamma"], "gamma": v["gamma"]}
    texts = {}
    for model, version in cases.items():
        r = httpx.post(f"{served.url}/v1/completions", json={"model": model, "prompt": "The movie was",
                                                              "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == f"{model.split('@')[0].split('==')[0]}=={version}"
        assert r.headers["x-loraflow-adapter-version"] == version
        assert r.headers["x-loraflow-adapter-sha256"] == _sha(served, version)
        assert body["system_fingerprint"] == f"sha256:{_sha(served, version)}"
        texts.setdefault(version, set()).add(body["choices"][0]["text"])
    assert all(len(t) == 1 for t in texts.values()) and len({t.pop() for t in texts.values()}) == 3  # 3 adapters

    for model in ("nope", "alpha@latest", f"alpha=={v['alpha2']}", f"beta=={v['alpha']}"):
        r = httpx.post(f"{served.url}/v1/completions", json={"model": model, "prompt": "hi"}, timeout=60)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
        assert f"model {model!r} is not served here" in error["message"]
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # three served: which one?


def test_openai_client_streams_the_same_text_and_counts_usage(served, registry):
    import openai

    _, _, v = registry
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].text  # streamed as generated
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0
    assert {c.model for c in chunks} == {f"beta=={v['beta']}"}
    with client.completions.with_streaming_response.create(model="beta", prompt="x", max_tokens=2, stream=True) as raw:
        assert raw.headers["x-loraflow-adapter-version"] == v["beta"]
    # Stop strings end the stream without showing the stop string.
    cut = whole.choices[0].text[3:6]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="beta", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[cut], stream=True) if c.choices)
    assert streamed == whole.choices[0].text[:whole.choices[0].text.find(cut)]

    # No chat template in the GPT-2 tokenizer: one clear 400 naming messages.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert error["param"] == "messages" and "has no chat template" in error["message"]


def test_chat_completions_where_the_base_has_a_chat_template(registry, s3_server):
    import openai

    tmp, settings, v = registry
    served = Served(tmp / "chat", s3_server, settings, ["chatty@champion"])
    try:
        served.wait_ready(1)
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Any good films?"}]
        answer = client.chat.completions.create(model="chatty", messages=messages, max_tokens=6, temperature=0)
        assert answer.object == "chat.completion" and answer.model == f"chatty=={v['chatty']}"
        assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens == 6
        # The prompt is the template's rendering: the same text through /v1/completions agrees.
        prompt = "<|system|>Be brief.\n<|user|>Any good films?\n<|assistant|>"
        plain = client.completions.create(model="chatty", prompt=prompt, max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == plain.choices[0].text
        assert answer.usage.prompt_tokens == plain.usage.prompt_tokens
        streamed = list(client.chat.completions.create(model="chatty", messages=messages, max_tokens=6,
                                                       temperature=0, stream=True))
        assert streamed[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content
    finally:
        served.stop()


@pytest.mark.timeout(120)  # if the check let them through, the server would run until killed
def test_adapters_on_different_bases_are_refused_in_one_line(cli, registry, s3_server, monkeypatch):
    _, settings, _ = registry
    for key, value in s3_server.storage_overrides(settings.storage.bucket).items():
        if value is not None:
            monkeypatch.setenv(f"LORAFLOW_STORAGE__{key.upper()}", str(value))
    code, _, stderr = cli("serve", "alpha@champion", "chatty@champion", "--port", "0")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "chatty@champion is on base model" in stderr and "one process serves one base model" in stderr


def test_lru_bound_evicts_the_least_recently_used_and_loads_it_again(registry, s3_server):
    import httpx

    tmp, settings, v = registry
    served = Served(tmp / "lru", s3_server, settings, ["alpha@champion", "beta@champion", f"gamma=={v['gamma']}"],
                    max_loaded=2)
    try:
        served.wait_ready(3)
        holder = served.service.holder

        def ask(model):
            r = httpx.post(f"{served.url}/v1/completions", json={"model": model, "prompt": "The movie was",
                                                                  "max_tokens": 5, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        first = {m: ask(m) for m in ("alpha", "beta", "gamma")}
        for m in ("beta", "alpha", "gamma", "beta", "alpha"):
            assert ask(m) == first[m]  # the same tokens after being evicted and loaded again
            assert len(holder.loaded_versions()) <= 2
            gamma = next(e for e in holder.entries if e.version == v["gamma"])
            assert not gamma.evicted  # pinned: never evicted
        assert holder.evictions >= 3
        info = httpx.get(f"{served.url}/v1/adapter").json()
        assert info["max_loaded"] == 2 and info["evictions"] == holder.evictions
    finally:
        served.stop()


def test_aliases_moving_under_batched_load_fail_no_request(served, registry):
    """Two aliases move back and forth while 8 clients (both adapters) generate: every request is
    answered 200, batches hold several adapters, and each answer's headers match its body."""
    import httpx

    from loraflow.registry import set_alias

    _, settings, v = registry
    records: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        model = ("alpha", "beta")[i % 2]
        with httpx.Client(base_url=served.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i % 4],
                                                           "max_tokens": 8, "temperature": 0})
                    body = r.json()
                    record = (r.status_code, body.get("model"), r.headers.get("x-loraflow-adapter-version"))
                except httpx.HTTPError as exc:
                    record = (0, repr(exc), None)
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        for target in ("alpha2", "beta2", "alpha", "beta", "alpha2", "beta2"):
            name = target.rstrip("2")
            set_alias(settings, name, "champion", v[target])
            assert wait_for(lambda n=name, t=target: any(m == f"{n}=={v[t]}" for _, m, _ in records[-8:]),
                            timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(records) > 40 and [r for r in records if r[0] != 200] == []
    assert all(m.split("==")[1] == h for _, m, h in records)
    served_versions = {m for _, m, _ in records}
    assert {f"alpha=={v['alpha2']}", f"beta=={v['beta2']}", f"alpha=={v['alpha']}", f"beta=={v['beta']}"} <= \
        served_versions
    info = served.service.describe()
    assert info["scheduler"]["peak_batch"] >= 4
    # The old versions are unloaded once their last request has finished.
    assert wait_for(lambda: sorted(served.service.holder.loaded_versions()) ==
                    sorted([v["alpha2"], v["beta2"], v["gamma"]]), timeout=10)
    moved = {a["ref"]: a["swaps"] for a in info["adapters"]}
    assert moved["alpha@champion"] == 3 and moved["beta@champion"] == 3
    assert json.dumps(info)  # /v1/adapter stays serialisable
