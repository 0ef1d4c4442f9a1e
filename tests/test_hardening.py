"""Hardening: no unverified or wrong adapter comes back with exit 0, no run continues someone else's
checkpoints, and every bad input gets one clear line with nothing left behind. Each test covers a
family with several members (real S3 server, real training on the tiny GPT-2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "loraflow.cli"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# --- integrity: never return what was not verified -------------------------------------------------

def test_store_data_never_becomes_a_local_path_and_edited_cache_is_pulled_again(
        cli, s3_server, s3_settings, tiny_adapter_dir, tmp_path):
    from loraflow.registry import publish_adapter, pull_adapter
    from loraflow.registry.layout import Layout
    from loraflow.storage.store import Store

    pv = publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=["latest"])
    store, layout = Store(s3_settings.storage), Layout.for_name(s3_settings.storage, "m")
    cache = tmp_path / "cache"
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "manifest.json").write_text("{}")
    storage = ["--set", f"storage.endpoint_url={s3_server.endpoint_url}", "--set",
               f"storage.bucket={s3_settings.storage.bucket}"]
    for target in (os.path.relpath(decoy, cache / "m"), "../../../../tmp/x", "", "20200101T000000.000Z-abcdef/.."):
        alias = json.loads(store.get_bytes(layout.alias_key("latest"))[0])
        alias["version"], alias["alias"] = target, "evil"
        store.put_json(layout.alias_key("evil"), alias)
        code, out, err = cli("pull", "m@evil", "--dest", str(cache), *storage)
        assert code != 0 and out == "", (target, out)
        assert "invalid version" in _one_line(err)

    # A cache entry edited in place (here: its metrics rewritten) is noticed and pulled again.
    path = pull_adapter(f"m=={pv.version}", settings=s3_settings, dest=cache)
    original = (path / "metrics.json").read_bytes()
    (path / "metrics.json").write_text('{"adapter_ppl": 1.0}')
    again = pull_adapter(f"m=={pv.version}", settings=s3_settings, dest=cache)
    assert (again / "metrics.json").read_bytes() == original
    (again / "extra.txt").write_text("added")  # an added file counts as an edit too
    assert not (pull_adapter("m@latest", settings=s3_settings, dest=cache) / "extra.txt").exists()


def test_publish_refuses_links_fakes_and_blank_names(cli, s3_server, s3_bucket, tiny_adapter_dir, tmp_path):
    storage = ["--set", f"storage.endpoint_url={s3_server.endpoint_url}", "--set", f"storage.bucket={s3_bucket}"]
    secret_file = tmp_path / "env"
    secret_file.write_text("AWS_SECRET_ACCESS_KEY=do-not-upload")

    linked = tmp_path / "linked"
    shutil.copytree(tiny_adapter_dir, linked)
    (linked / "notes.txt").symlink_to(secret_file)
    linked_dir = tmp_path / "linked-dir"
    shutil.copytree(tiny_adapter_dir, linked_dir)
    (linked_dir / "adapter_model.safetensors").unlink()
    (linked_dir / "adapter_model.safetensors").symlink_to(tiny_adapter_dir / "adapter_model.safetensors")
    fake = tmp_path / "fake"
    shutil.copytree(tiny_adapter_dir, fake)
    (fake / "adapter_model.safetensors").write_bytes(b"\x80\x04\x95 a pickle, renamed")

    cases = {
        "symlinked extra file": (["publish", str(linked), "--name", "m"], "is a symlink"),
        "symlinked weights": (["publish", str(linked_dir), "--name", "m"], "is a symlink"),
        "not safetensors": (["publish", str(fake), "--name", "m"], "not a valid safetensors file"),
        "empty name": (["publish", str(tiny_adapter_dir), "--name", ""], "invalid adapter name ''"),
        "blank name": (["publish", str(tiny_adapter_dir), "--name", "  "], "invalid adapter name '  '"),
    }
    for what, (argv, message) in cases.items():
        code, out, err = cli(*argv, *storage)
        assert code != 0 and message in _one_line(err), what
    bucket_files = [p for p in (s3_server.root / s3_bucket).rglob("*") if p.is_file()]
    assert not any(b"do-not-upload" in p.read_bytes() for p in bucket_files)
    assert not (s3_server.root / s3_bucket / "adapters").exists()  # nothing at all was published


# --- resume: never continue someone else's run -----------------------------------------------------

def test_resume_only_continues_its_own_complete_checkpoints(cli, tiny_overrides, tmp_path, imdb_data_dir):
    out = tmp_path / "run"
    base = [*tiny_overrides, "training.save_steps=2", "training.save_total_limit=3"]
    code, _, err = cli("train", *_sets([*base, "training.max_steps=4"]), "--output", str(out))
    assert code == 0, err
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    # Another run's settings or data: refused in one line naming what differs; nothing changes.
    other_data = tmp_path / "other-data"
    shutil.copytree(imdb_data_dir, other_data)
    with open(other_data / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "An extra review that changes the data fingerprint.", "label": 1}) + "\n")
    for change, named in (("lora.r=8", "lora.r 16 -> 8"), ("training.learning_rate=0.5", "training.learning_rate"),
                          (f"data.source={other_data}", "data.fingerprint")):
        code, _, err = cli("train", *_sets([*base, "training.max_steps=6", change]), "--output", str(out), "--resume")
        assert code == 2 and named in _one_line(err) and "--fresh" in err, (change, err[-500:])
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights

    # Already at max_steps: nothing more is trained, and the checkpoint's adapter is the result.
    code, _, err = cli("train", *_sets([*base, "training.max_steps=4"]), "--output", str(out), "--resume")
    assert code == 0 and "nothing left to train" in err and "step 5" not in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights

    # A checkpoint the process died while writing (no completion marker, a truncated file) is
    # skipped with a log line; the previous complete one is used.
    (out / "checkpoint-4" / "loraflow-run.json").unlink()
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"trunc")
    code, _, err = cli("train", *_sets([*base, "training.max_steps=6"]), "--output", str(out), "--resume")
    assert code == 0, err[-2000:]
    assert "skipping" in err and "checkpoint-4: incomplete" in err and "resuming from" in err and "checkpoint-2" in err

    # A fresh run (no --resume, or --fresh) in a folder with old checkpoints says it removes them.
    code, _, err = cli("train", *_sets([*base, "training.max_steps=2", "lora.r=8"]), "--output", str(out), "--fresh")
    assert code == 0 and "removing" in err and "checkpoint(s) of an earlier run" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


# --- bad input: one clear line, non-zero exit, nothing left behind -------------------------------

def test_settings_that_cannot_train_are_refused_before_anything_runs(cli, tiny_overrides, tmp_path):
    cases = {
        "training.lr_scheduler_type=bogus": "training.lr_scheduler_type",
        "training.num_train_epochs=.inf": "training.num_train_epochs: Input should be a finite number",
        "lora.lora_dropout=nan": "lora.lora_dropout",
    }
    for setting, message in cases.items():
        code, _, err = cli("config", "validate", "--set", setting)
        assert code == 2 and message in err, setting
    # Too large for this machine: refused with the estimate, before the model is loaded.
    out = tmp_path / "huge"
    code, _, err = cli("train", *_sets([*tiny_overrides, "data.max_length=1024",
                                         "training.per_device_train_batch_size=512"]), "--output", str(out))
    line = _one_line(err)
    assert code == 2 and "cannot fit" in line and "GiB" in line and "data.max_length=1024" in line
    assert not out.exists()  # the failed run left no folder behind
    # A learning rate of 0 trains nothing: said plainly.
    code, _, err = cli("train", *_sets([*tiny_overrides, "training.learning_rate=0", "training.max_steps=1"]),
                       "--output", str(tmp_path / "lr0"))
    assert code == 0 and "learning_rate=0: the weights will not move" in err


def test_data_that_is_not_what_it_says_is_one_line(cli, tiny_overrides, tmp_path):
    cases = {
        "latin-1": (b'{"text": "caf\xe9 and a great film"}\n{"text": "fine"}\n', "is not UTF-8 text"),
        "empty": (b"", "the dataset is empty"),
        "numbers": (b'{"text": 5}\n{"text": 7}\n', "holds int values, not text"),
        "not json": (b"this is not json\n", "cannot read"),
    }
    for what, (body, message) in cases.items():
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        (folder / "train.jsonl").write_bytes(body)
        code, _, err = cli("train", *_sets([*tiny_overrides, f"data.source={folder}"]), "--output",
                           str(tmp_path / f"out-{folder.name}"))
        assert code != 0 and message in _one_line(err), what
        assert not (tmp_path / f"out-{folder.name}").exists(), what


def test_paths_of_the_wrong_kind_are_one_line(cli, tiny_overrides, s3_server, s3_bucket, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    storage = ["--set", f"storage.endpoint_url={s3_server.endpoint_url}", "--set", f"storage.bucket={s3_bucket}"]
    cases = [
        (["train", *_sets(tiny_overrides), "--output", str(a_file)], "--output", "is a file, not a folder"),
        (["pull", "m@latest", "--dest", str(a_file), *storage], "--dest", "is a file, not a folder"),
        (["storage", "serve", "--root", str(a_file), "--addr", "127.0.0.1:0"], "--root", "is a file, not a folder"),
        (["train", *_sets(tiny_overrides), "--output", str(a_file / "sub")], "--output", "cannot create it"),
    ]
    for argv, flag, message in cases:
        code, _, err = cli(*argv)
        line = _one_line(err)
        assert code == 2 and flag in line and message in line, argv


def test_killed_storage_serve_takes_its_server_along_and_a_busy_port_is_named(tmp_path):
    from loraflow.demo.s3server import free_port

    port = free_port()
    env = {**os.environ, "LORAFLOW_HOME": str(tmp_path / "home")}
    serve = [*CLI, "storage", "serve", "--root", str(tmp_path / "s3"), "--addr", f"127.0.0.1:{port}"]
    first = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in first.stdout.readline()
        second = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and f"127.0.0.1:{port} is already in use" in _one_line(second.stderr)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the rclone child got SIGTERM from the kernel
        found = subprocess.run(["pgrep", "-f", f"serve s3 {tmp_path / 's3'}"], capture_output=True, text=True)
        if not found.stdout.strip():
            break
        time.sleep(0.2)
    assert not found.stdout.strip(), "rclone outlived its killed parent"
