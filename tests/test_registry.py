"""Adapter registry against the real local S3 server (rclone serve s3)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fixtures_s3 import s3_settings_for
from loraflow.errors import ConfigError, IntegrityError, StorageError
from loraflow.registry import (
    ANY, AliasConflictError, gc_adapter, get_alias, list_versions, publish_adapter, pull_adapter,
    read_manifest, set_alias,
)
from loraflow.registry.layout import Layout, check_name, parse_ref


def _objects(server, bucket) -> dict[str, Path]:
    root = server.root / bucket
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_writes_layout_and_manifest(s3_server, s3_bucket, s3_settings, tiny_adapter_dir):
    pv = publish_adapter(s3_settings, tiny_adapter_dir, name="imdb", extra={"flow_run_id": "run-123"},
                         train={"dataset_source": "imdb", "dataset_fingerprint": "fp-1"},
                         evaluation={"adapter_ppl": 12.5})
    prefix = f"adapters/imdb/versions/{pv.version}/"
    objects = _objects(s3_server, s3_bucket)
    assert {k for k in objects if k.startswith(prefix)} == {
        prefix + n for n in ("adapter_config.json", "adapter_model.safetensors", "README.md",
                             "metrics.json", "loraflow.yaml", "manifest.json")}
    manifest = json.loads(objects[prefix + "manifest.json"].read_text())
    assert manifest == read_manifest(s3_settings, "imdb", pv.version) == pv.manifest
    for entry in manifest["files"]:
        stored = objects[prefix + entry["name"]]
        assert entry["size"] == stored.stat().st_size and entry["sha256"] == _sha(stored)
    assert _sha(objects[prefix + "adapter_model.safetensors"]) == _sha(tiny_adapter_dir / "adapter_model.safetensors")
    assert manifest["flow_run_id"] == "run-123"
    assert manifest["dataset"] == {"source": "imdb", "fingerprint": "fp-1"}
    assert manifest["metrics"] == {"adapter_ppl": 12.5}
    assert manifest["base_model"]["id"] == json.loads(
        (tiny_adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert manifest["lora"]["r"] == 4 and manifest["settings"]["lora"]["r"] == 16
    assert manifest["loraflow"]["version"] and manifest["created_at"].endswith("Z")
    assert get_alias(s3_settings, "imdb", "latest") == pv.version
    # The secret is nowhere in storage: settings hold none, and no object carries it.
    secret = s3_server.secret_key.encode()
    assert "storage" not in manifest["settings"]
    assert not [k for k, p in objects.items() if secret in p.read_bytes()]


def test_versions_sort_by_creation_and_list_metrics(s3_settings, tiny_adapter_dir):
    first = publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=[], evaluation={"adapter_ppl": 3.0})
    second = publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=["latest"])
    assert first.version < second.version
    rows = list_versions(s3_settings, "m")
    assert [r["version"] for r in rows] == [first.version, second.version]
    assert rows[0]["metrics"] == {"adapter_ppl": 3.0} and rows[0]["aliases"] == []
    assert rows[1]["aliases"] == ["latest"] and rows[1]["size"] > 0


def test_pull_verifies_caches_and_loads_with_peft(s3_server, s3_bucket, s3_settings, tiny_adapter_dir,
                                                  tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pv = publish_adapter(s3_settings, tiny_adapter_dir, name="imdb")
    cache = tmp_path / "cache"
    path = pull_adapter("imdb", settings=s3_settings, dest=cache)
    assert path == cache / "imdb" / pv.version
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json", "metrics.json"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 4

    # Second pull downloads nothing: with the weights gone from the server it still answers.
    mtime = (path / "adapter_model.safetensors").stat().st_mtime_ns
    (s3_server.root / s3_bucket / f"adapters/imdb/versions/{pv.version}/adapter_model.safetensors").unlink()
    assert pull_adapter("imdb@latest", settings=s3_settings, dest=cache) == path
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    # A pinned version in the cache needs no server at all.
    offline = s3_settings_for(s3_server, s3_bucket)
    offline.storage.endpoint_url = "http://127.0.0.1:9"
    assert pull_adapter(f"imdb=={pv.version}", settings=offline, dest=cache) == path

    # The seed's snippet loads it, and it is the adapter that was published.
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        pulled = PeftModel.from_pretrained(base, str(path)).eval()(ids).logits
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             str(tiny_adapter_dir)).eval()(ids).logits
    assert torch.allclose(pulled, original) and not torch.allclose(pulled, base_logits)


def test_load_adapter_uses_base_model_from_manifest(s3_settings, tiny_adapter_dir, tmp_path):
    from peft import PeftModel

    from loraflow import load_adapter

    publish_adapter(s3_settings, tiny_adapter_dir, name="imdb")
    model = load_adapter("imdb", settings=s3_settings, dest=tmp_path)
    assert isinstance(model, PeftModel) and model.peft_config["default"].r == 4


def test_flipped_byte_is_refused_and_nothing_cached(s3_server, s3_bucket, s3_settings, tiny_adapter_dir, tmp_path):
    pv = publish_adapter(s3_settings, tiny_adapter_dir, name="imdb")
    stored = s3_server.root / s3_bucket / f"adapters/imdb/versions/{pv.version}/adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors: content does not match the manifest"):
        pull_adapter("imdb@latest", settings=s3_settings, dest=tmp_path)
    assert list((tmp_path / "imdb").iterdir()) == []  # no version dir, no temporary leftovers


def test_pickled_weights_refused_both_ways(s3_server, s3_bucket, s3_settings, tiny_adapter_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapter_dir, bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ConfigError, match="pickled files are refused"):
        publish_adapter(s3_settings, bad, name="imdb")
    # A manifest in storage that lists a pickle is refused before anything is downloaded.
    pv = publish_adapter(s3_settings, tiny_adapter_dir, name="imdb")
    manifest_path = s3_server.root / s3_bucket / f"adapters/imdb/versions/{pv.version}/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"name": "adapter_model.bin", "size": 1, "sha256": "0" * 64})
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="pickled files are refused"):
        pull_adapter("imdb", settings=s3_settings, dest=tmp_path / "cache")
    assert not (tmp_path / "cache" / "imdb" / pv.version).exists()


@pytest.mark.parametrize("name", ["../etc", "a/b", "a b", "", "..", ".hidden", "x" * 129, "a\nb", "ok..no"])
def test_bad_names_are_refused(name):
    with pytest.raises(ConfigError):
        check_name(name)


def test_refs_parse():
    assert parse_ref("imdb") == ("imdb", "latest", None)
    assert parse_ref("imdb@champion") == ("imdb", "champion", None)
    assert parse_ref("imdb==20261129T013000.123Z-a1b2c3") == ("imdb", None, "20261129T013000.123Z-a1b2c3")
    for bad in ("imdb==../../x", "imdb@../x", "../imdb"):
        with pytest.raises(ConfigError):
            parse_ref(bad)
    layout = Layout("b", "/team/x/", "imdb")
    assert layout.alias_key("latest") == "team/x/adapters/imdb/aliases/latest.json"


def test_alias_compare_and_swap(s3_settings, tiny_adapter_dir):
    a = publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=[])
    b = publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=[])
    set_alias(s3_settings, "m", "champion", a.version, expected_version=None)
    with pytest.raises(AliasConflictError, match="points at .*expected nothing"):
        set_alias(s3_settings, "m", "champion", b.version, expected_version=None)
    with pytest.raises(AliasConflictError):
        set_alias(s3_settings, "m", "champion", b.version, expected_version=b.version)
    set_alias(s3_settings, "m", "champion", b.version, expected_version=a.version)
    assert get_alias(s3_settings, "m", "champion") == b.version
    set_alias(s3_settings, "m", "champion", a.version, expected_version=ANY)  # rollback
    assert get_alias(s3_settings, "m", "champion") == a.version
    with pytest.raises(StorageError, match="does not exist"):
        set_alias(s3_settings, "m", "champion", "20200101T000000.000Z-abcdef")
    # `latest` only moves forward: re-publishing aliases onto an older version leaves it.
    publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=["latest"])
    newest = get_alias(s3_settings, "m", "latest")
    from loraflow.registry.aliases import advance_alias
    from loraflow.registry.catalog import open_registry

    store, layout = open_registry(s3_settings, "m")
    assert advance_alias(store, layout, "latest", a.version) == newest


def test_rclone_ignores_conditional_writes_so_the_lock_is_used(s3_settings):
    """Evidence for the CAS mechanism: rclone 1.75.2 answers 200 to a PutObject whose
    If-None-Match/If-Match should fail, so the probe must pick the lock."""
    from loraflow.registry.aliases import _probe, cas_mode
    from loraflow.storage.store import Store

    store = Store(s3_settings.storage)
    store.put_bytes("k.json", b"1")
    store.client.put_object(Bucket=store.bucket, Key="k.json", Body=b"2", IfNoneMatch="*")
    store.client.put_object(Bucket=store.bucket, Key="k.json", Body=b"3", IfMatch='"' + "0" * 32 + '"')
    assert store.get_bytes("k.json")[0] == b"3"
    assert _probe(store) == "lock" and cas_mode(store) == "lock"


def test_stale_lock_claims_are_ignored_and_collected(s3_settings, tiny_adapter_dir, monkeypatch):
    import time

    from loraflow.registry import aliases
    from loraflow.registry.catalog import open_registry

    a = publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=[])
    store, layout = open_registry(s3_settings, "m")
    crashed = f"{layout.lock_prefix('champion')}{time.time_ns() - int(3600e9):020d}-dead.json"
    store.put_json(crashed, {"owner": "crashed"})
    set_alias(s3_settings, "m", "champion", a.version)  # not blocked by the crashed writer's claim
    assert get_alias(s3_settings, "m", "champion") == a.version
    assert not store.exists(crashed)
    # A live claim held by someone else blocks until the timeout, with a clear message.
    live = f"{layout.lock_prefix('champion')}{time.time_ns():020d}-live.json"
    store.put_json(live, {"owner": "other"})
    monkeypatch.setattr(aliases, "ACQUIRE_TIMEOUT_S", 1.0)
    with pytest.raises(StorageError, match="is locked by another writer"):
        set_alias(s3_settings, "m", "champion", a.version, expected_version=None)


def test_gc_removes_only_old_incomplete_versions(s3_server, s3_bucket, s3_settings, tiny_adapter_dir):
    from loraflow.registry.catalog import open_registry

    good = publish_adapter(s3_settings, tiny_adapter_dir, name="m")
    store, layout = open_registry(s3_settings, "m")
    leftover = "20200101T000000.000Z-abcdef"
    store.put_bytes(layout.file_key(leftover, "adapter_config.json"), b"{}")
    assert [r["version"] for r in list_versions(s3_settings, "m")] == [good.version]  # invisible
    kept = gc_adapter(s3_settings, "m")  # default grace: an hour; the leftover was just written
    assert kept.removed_versions == [] and kept.kept_recent == [leftover]
    report = gc_adapter(s3_settings, "m", grace_seconds=0)
    assert report.removed_versions == [leftover] and report.removed_objects == 1
    assert not store.exists(layout.file_key(leftover, "adapter_config.json"))
    assert pull_adapter(f"m=={good.version}", settings=s3_settings, dest=s3_server.root.parent / "gc-cache")


# --- CLI ---------------------------------------------------------------------------------------

def _storage_args(server, bucket, endpoint=None):
    return ["--set", f"storage.endpoint_url={endpoint or server.endpoint_url}", "--set", f"storage.bucket={bucket}"]


def test_cli_publish_versions_promote_pull_gc(cli, s3_server, s3_bucket, tiny_adapter_dir, tmp_path):
    args = _storage_args(s3_server, s3_bucket)
    code, out, err = cli("publish", str(tiny_adapter_dir), "--name", "imdb", "--alias", "latest", *args)
    assert code == 0, err
    v1 = out.split()[0].split("==")[1]
    code, out, _ = cli("publish", str(tiny_adapter_dir), "--name", "imdb", "--no-alias", *args)
    v2 = out.split()[0].split("==")[1]
    assert cli("promote", "imdb", v2, "--alias", "champion", *args)[0] == 0
    code, out, _ = cli("versions", "imdb", *args)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "CREATED"]
    assert lines[1].startswith(v1) and lines[1].endswith("latest")
    assert lines[2].startswith(v2) and lines[2].endswith("champion")
    code, out, _ = cli("pull", "imdb@champion", "--dest", str(tmp_path), *args)
    assert code == 0 and out.strip() == str(tmp_path / "imdb" / v2)
    code, out, _ = cli("promote", "imdb", v1, "--alias", "champion", "--expect", v1, *args)  # stale expectation
    assert code == 1
    code, out, _ = cli("gc", "imdb", "--grace", "0", *args)
    assert code == 0 and out.startswith("removed 0 incomplete version(s)")


def test_cli_versions_json_shows_the_base_model_of_both_manifest_schemas(cli, s3_server, s3_bucket, s3_settings,
                                                                           tiny_adapter_dir):
    """`versions --json` names the logical base model: schema 2 records {id, revision, weights},
    schema-1 manifests (still in buckets) recorded `name_or_path`."""
    identity = {"id": "org/base-model", "revision": "0123abc", "weights": {"model.safetensors": "0" * 64}}
    new = publish_adapter(s3_settings, tiny_adapter_dir, name="imdb", train={"base_model_identity": identity})
    old = publish_adapter(s3_settings, tiny_adapter_dir, name="imdb")
    # Rewrite the second version's manifest as schema 1 wrote it (the manifest is not in its own list).
    path = s3_server.root / s3_bucket / f"adapters/imdb/versions/{old.version}/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema"] = 1
    manifest["base_model"] = {"name_or_path": "org/old-base", "revision": None}
    path.write_text(json.dumps(manifest))

    code, out, err = cli("versions", "imdb", "--json", *_storage_args(s3_server, s3_bucket))
    assert code == 0, err
    rows = {r["version"]: r for r in json.loads(out)}
    assert (rows[new.version]["base_model"], rows[new.version]["base_model_revision"]) == ("org/base-model", "0123abc")
    assert (rows[old.version]["base_model"], rows[old.version]["base_model_revision"]) == ("org/old-base", None)


def _one_line_error(cli, *argv) -> str:
    code, out, err = cli(*argv)
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_cli_errors_are_one_clear_line_without_secrets(cli, s3_server, s3_bucket, tiny_adapter_dir, tmp_path,
                                                       monkeypatch):
    ok = _storage_args(s3_server, s3_bucket)
    cli("publish", str(tiny_adapter_dir), "--name", "imdb", *ok)
    wrong_secret = "wrong-" + s3_server.secret_key
    with monkeypatch.context() as env:
        env.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)  # the credential chain hands boto3 a bad key
        wrong = _one_line_error(cli, "publish", str(tiny_adapter_dir), "--name", "imdb", *ok)
    errors = {
        "unknown name": _one_line_error(cli, "pull", "nope", "--dest", str(tmp_path), *ok),
        "unknown alias": _one_line_error(cli, "pull", "imdb@champion", "--dest", str(tmp_path), *ok),
        "unknown version": _one_line_error(cli, "pull", "imdb==20200101T000000.000Z-abcdef", "--dest",
                                           str(tmp_path), *ok),
        "versions of unknown": _one_line_error(cli, "versions", "nope", *ok),
        "bad name": _one_line_error(cli, "publish", str(tiny_adapter_dir), "--name", "../x", *ok),
        "missing bucket": _one_line_error(cli, "versions", "imdb", *_storage_args(s3_server, "no-such-bucket")),
        "wrong secret": wrong,
        "unreachable": _one_line_error(cli, "pull", "imdb", "--dest", str(tmp_path),
                                       *_storage_args(s3_server, s3_bucket, endpoint="http://127.0.0.1:9")),
        "not an adapter": _one_line_error(cli, "publish", str(tmp_path), "--name", "imdb", *ok),
    }
    assert "no adapter named 'nope'" in errors["unknown name"]
    assert "has no alias 'champion'" in errors["unknown alias"]
    assert "20200101T000000.000Z-abcdef of adapter 'imdb' does not exist" in errors["unknown version"]
    assert "no adapter named 'nope'" in errors["versions of unknown"]
    assert "invalid adapter name '../x'" in errors["bad name"]
    assert "bucket 'no-such-bucket' does not exist" in errors["missing bucket"]
    assert "secret access key is wrong" in errors["wrong secret"]
    assert "cannot reach the storage endpoint" in errors["unreachable"]
    assert "not a PEFT adapter directory" in errors["not an adapter"]
    for line in errors.values():
        assert s3_server.secret_key not in line and wrong_secret not in line
