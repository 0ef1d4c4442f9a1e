"""loraflow.follow on the real local S3 server: delivers the current version and every move,
verified; skips a version the alias left while it was being pulled; never delivers a corrupt
version; keeps the current one through a store outage and picks up moves after it."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from conftest import wait_for
from fixtures_s3 import make_adapter_dir




@pytest.fixture(scope="module")
def second_adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter_dir(tmp_path_factory.mktemp("adapter-b"), tiny_model_dir, seed=1)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, path, manifest) -> None:
        # What the follower promises: a complete directory whose files match its manifest.
        from loraflow.hashing import sha256_file

        for entry in manifest["files"]:
            assert sha256_file(path / entry["name"]) == entry["sha256"], entry["name"]
        with self.lock:
            self.calls.append((manifest["version"], str(path)))

    @property
    def versions(self) -> list[str]:
        with self.lock:
            return [v for v, _ in self.calls]


def test_follow_delivers_current_and_moves_and_skips_corrupt(s3_settings, s3_server, tiny_adapter_dir,
                                                              second_adapter_dir, tmp_path, caplog):
    import loraflow
    from loraflow.registry import publish_adapter, set_alias

    v1 = publish_adapter(s3_settings, tiny_adapter_dir, name="f", aliases=["champion"]).version
    v2 = publish_adapter(s3_settings, second_adapter_dir, name="f", aliases=[]).version
    record = Recorder()
    follower = loraflow.follow("f@champion", on_change=record, settings=s3_settings, interval=0.05,
                               dest=tmp_path / "cache")
    try:
        assert wait_for(lambda: record.versions == [v1])
        assert record.calls[0][1] == str(tmp_path / "cache" / "f" / v1)
        set_alias(s3_settings, "f", "champion", v2)
        assert wait_for(lambda: record.versions == [v1, v2])
        assert follower.current == v2

        # A third version whose weights were altered in the bucket after publishing: never delivered.
        v3 = publish_adapter(s3_settings, tiny_adapter_dir, name="f", aliases=[]).version
        stored = s3_server.root / s3_settings.storage.bucket / "adapters" / "f" / "versions" / v3
        weights = stored / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        with caplog.at_level(logging.WARNING, logger="loraflow"):
            set_alias(s3_settings, "f", "champion", v3)
            assert wait_for(lambda: follower.last_error is not None)
            polls = follower.polls
            assert wait_for(lambda: follower.polls >= polls + 2)
        assert "adapter_model.safetensors" in follower.last_error
        assert record.versions == [v1, v2] and follower.current == v2
        assert not (tmp_path / "cache" / "f" / v3).exists()
        warnings = [r for r in caplog.records if r.name == "loraflow.follow"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line, not one per poll

        # Rollback is just another move; the error clears.
        set_alias(s3_settings, "f", "champion", v1)
        assert wait_for(lambda: record.versions == [v1, v2, v1] and follower.last_error is None)
    finally:
        follower.stop()
    assert not follower._thread.is_alive()


def test_alias_moving_during_a_pull_delivers_only_the_newest(s3_settings, tiny_adapter_dir, second_adapter_dir,
                                                              tmp_path):
    from loraflow.follow import Follower
    from loraflow.registry import publish_adapter, set_alias

    v1 = publish_adapter(s3_settings, tiny_adapter_dir, name="g", aliases=["champion"]).version
    v2 = publish_adapter(s3_settings, second_adapter_dir, name="g", aliases=[]).version

    class MovedDuringPull(Follower):
        """The alias is moved by someone else while the first pull is on the wire."""

        def pull(self, version):
            path = super().pull(version)
            if version == v1 and not hasattr(self, "moved"):
                self.moved = True
                set_alias(s3_settings, "g", "champion", v2)
            return path

    record = Recorder()
    follower = MovedDuringPull("g@champion", record, settings=s3_settings, interval=0.05, dest=tmp_path / "c")
    assert follower.check() == v2
    assert record.versions == [v2]  # v1 was pulled but never handed over


def test_store_outage_keeps_current_and_recovers(tmp_path, tiny_adapter_dir, second_adapter_dir, caplog):
    from loraflow.demo.s3server import LocalS3Server, free_port
    from loraflow.follow import follow
    from loraflow.registry import publish_adapter, set_alias
    from loraflow.settings import load_settings

    addr = f"127.0.0.1:{free_port()}"
    keys = {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    server = LocalS3Server(tmp_path / "root", addr, buckets=("outage",), **keys).start()
    settings = load_settings(storage=server.storage_overrides("outage"))
    v1 = publish_adapter(settings, tiny_adapter_dir, name="o", aliases=["champion"]).version
    v2 = publish_adapter(settings, second_adapter_dir, name="o", aliases=[]).version
    record = Recorder()
    follower = follow("o@champion", record, settings=settings, interval=0.05, max_backoff=0.5, dest=tmp_path / "c")
    try:
        assert wait_for(lambda: record.versions == [v1])
        with caplog.at_level(logging.INFO, logger="loraflow"):
            server.stop()
            assert wait_for(lambda: follower.last_error is not None)
            assert "cannot reach the storage endpoint" in follower.last_error
            assert follower.current == v1
            server = LocalS3Server(tmp_path / "root", addr, buckets=("outage",), **keys).start()
            assert wait_for(lambda: follower.last_error is None)
        lines = [r.getMessage() for r in caplog.records if r.name == "loraflow.follow"]
        assert len(lines) == 2 and "keeping " + v1 in lines[0] and "reachable again" in lines[1], lines
        set_alias(settings, "o", "champion", v2)
        assert wait_for(lambda: record.versions == [v1, v2])
    finally:
        follower.stop()
        server.stop()
