"""Registry faults against the real server: concurrent writers, a server killed mid-publish,
readers racing publishers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_s3 import make_random_adapter_dir, registry_env, s3_settings_for
from loraflow.errors import StorageError
from loraflow.registry import get_alias, list_versions, publish_adapter, pull_adapter
from loraflow.registry.catalog import complete_versions, open_registry

WORKER = str(Path(__file__).with_name("registry_worker.py"))
CLI = [sys.executable, "-m", "loraflow.cli"]


def _worker(env, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_publishers_lose_nothing_and_latest_is_never_dangling(s3_server, s3_bucket, s3_settings,
                                                                  tiny_adapter_dir):
    env = registry_env(s3_server, s3_bucket)
    procs = [_worker(env, "publish", str(tiny_adapter_dir), "imdb", "3") for _ in range(2)]
    store, layout = open_registry(s3_settings, "imdb")
    seen = set()
    while any(p.poll() is None for p in procs):
        version = get_alias(s3_settings, "imdb", "latest")
        if version:  # whenever the alias exists, its manifest does
            assert store.exists(layout.manifest_key(version)), version
            seen.add(version)
        time.sleep(0.05)
    published = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err
        published += out.split()
    assert len(published) == 6 == len(set(published))
    assert sorted(published) == [r["version"] for r in list_versions(s3_settings, "imdb")]
    assert get_alias(s3_settings, "imdb", "latest") == max(published)  # latest never moves backwards
    assert seen  # the reader did observe the alias while publishers ran


def test_concurrent_compare_and_swap_forms_one_chain(s3_server, s3_bucket, s3_settings, tiny_adapter_dir):
    """Two processes CAS-move one alias, each to versions only it uses. With a working CAS the
    successful swaps form a single chain: no two successes replaced the same version."""
    versions = [publish_adapter(s3_settings, tiny_adapter_dir, name="m", aliases=[]).version for _ in range(9)]
    env = registry_env(s3_server, s3_bucket)
    start = f"{time.time() + 8:.3f}"  # both begin at once, well after their imports
    procs = [_worker(env, "swap", "m", "champion", ",".join(versions[1 + 4 * i: 5 + 4 * i]), start)
             for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results += out.splitlines()
    swaps = [line.split()[1:] for line in results if line.startswith("ok")]
    assert swaps and len(results) == 8
    previous = [prev for prev, _ in swaps]
    assert len(previous) == len(set(previous)), f"two swaps replaced the same version: {swaps}"
    chain = {prev: new for prev, new in swaps}
    node, steps = "None", 0
    while node in chain:
        node, steps = chain[node], steps + 1
    assert steps == len(swaps) and get_alias(s3_settings, "m", "champion") == node


@pytest.fixture
def own_server(tmp_path):
    from loraflow.demo.s3server import LocalS3Server

    server = LocalS3Server(tmp_path / "root", "127.0.0.1:0", access_key=os.environ["AWS_ACCESS_KEY_ID"],
                           secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], buckets=("faults",))
    with server:
        yield server


def test_server_killed_mid_publish_leaves_no_version(own_server, tmp_path):
    big = make_random_adapter_dir(tmp_path / "big", 200)
    settings = s3_settings_for(own_server, "faults")
    env = registry_env(own_server, "faults")
    proc = subprocess.Popen([*CLI, "publish", str(big), "--name", "big"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    versions_dir = own_server.root / "faults" / "adapters" / "big" / "versions"
    deadline = time.monotonic() + 60

    def small_files_landed() -> bool:  # kill once a version has some objects, while the weights upload
        return any(p.stat().st_size > 0 for p in versions_dir.glob("*/adapter_config.json"))

    while not small_files_landed() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "publish finished before the server could be killed"
    own_server.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert own_server.secret_key not in err

    own_server.start()  # same directory, same port: what was uploaded is still there
    leftovers = [d.name for d in versions_dir.iterdir() if any(d.iterdir())]
    assert len(leftovers) == 1 and not (versions_dir / leftovers[0] / "manifest.json").exists()
    assert list_versions(settings, "big") == []
    with pytest.raises(StorageError, match="no adapter named 'big'"):
        pull_adapter("big", settings=settings, dest=tmp_path / "cache")

    done = subprocess.run([*CLI, "publish", str(big), "--name", "big"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [row] = list_versions(settings, "big")
    assert done.stdout.startswith(f"big=={row['version']}")
    path = pull_adapter("big", settings=settings, dest=tmp_path / "cache")
    assert (path / "adapter_model.safetensors").read_bytes() == (big / "adapter_model.safetensors").read_bytes()
    gc = subprocess.run([*CLI, "gc", "big", "--grace", "0"], env=env, capture_output=True, text=True)
    assert gc.returncode == 0 and gc.stdout.startswith("removed 1 incomplete version(s)"), gc.stdout
    # What the store holds (rclone may keep a killed upload's temporary file on its disk; that is
    # no object, invisible to every client, and not the registry's to see).
    from loraflow.registry.layout import Layout
    from loraflow.storage.store import Store

    layout = Layout.for_name(settings.storage, "big")
    stored = {obj["Key"][len(layout.versions_prefix):].split("/")[0] for obj in Store(settings.storage).list(layout.versions_prefix)}
    assert stored == {row["version"]}


def test_pull_during_publish_sees_only_complete_versions(s3_server, s3_bucket, s3_settings, tmp_path):
    adapter = make_random_adapter_dir(tmp_path / "mid", 24)
    env = registry_env(s3_server, s3_bucket)
    proc = _worker(env, "publish", str(adapter), "mid", "3")
    store, layout = open_registry(s3_settings, "mid")
    pulled, early = set(), 0
    while proc.poll() is None:
        for version in complete_versions(store, layout):  # every listed version pulls and verifies
            pulled.add(pull_adapter(f"mid=={version}", settings=s3_settings, dest=tmp_path / "cache").name)
        try:
            pulled.add(pull_adapter("mid@latest", settings=s3_settings, dest=tmp_path / "cache").name)
        except StorageError as exc:
            # Before the first manifest, or between a manifest and its alias.
            assert "no adapter named 'mid'" in str(exc) or "has no alias 'latest'" in str(exc)
            early += 1
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert pulled and pulled <= set(out.split())
    cached = sorted(p.name for p in (tmp_path / "cache" / "mid").iterdir())
    assert cached == sorted(pulled)  # no temporary or partial directories left behind
