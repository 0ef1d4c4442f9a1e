"""Registry transfer speed vs raw boto3 on the same local S3 server (rclone serve s3), one run.

    .venv/bin/python bench/storage.py [--size-mb 100] [--rounds 3]

Publishes and pulls a ~100 MB adapter (random LoRA weights, valid adapter_config.json) and moves
the same safetensors file with plain boto3 `upload_file`/`download_file` (s3transfer's default
8 MiB x 10 parts; loraflow uploads the same way and downloads in 64 MiB x 4 ranges),
alternating the two so the machine's drift hits both alike; reports the best of `rounds` for each
(targets: publish and pull >= 0.9x raw throughput) and the latency of a cached pull (<= 100 ms).
Publish includes what raw does not: sha256 of every file, ETag verification, manifest. Alias moves
are timed separately: on a server without conditional writes they take the lock (a fixed settle wait).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loraflow.demo.s3server import LocalS3Server
from loraflow.demo.tiny_models import make_random_adapter_dir
from loraflow.registry import publish_adapter, pull_adapter, set_alias
from loraflow.settings import load_settings
from loraflow.storage.store import Store, transfer_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        tmp = Path(tmp)
        adapter = make_random_adapter_dir(tmp / "adapter", args.size_mb)
        weights = adapter / "adapter_model.safetensors"
        total = sum(p.stat().st_size for p in adapter.iterdir())
        with LocalS3Server(tmp / "root", "127.0.0.1:0", "bench-access", "bench-secret-local",
                           buckets=("bench",)) as server:
            os.environ.update(server.env())  # boto3's credential chain
            settings = load_settings(storage=server.storage_overrides("bench"))
            store = Store(settings.storage)
            client = store.client
            store.check_bucket()
            times: dict[str, list[float]] = {k: [] for k in ("raw_up", "publish", "raw_down", "pull")}
            versions = []
            for r in range(args.rounds):
                t = time.perf_counter()
                client.upload_file(str(weights), "bench", f"raw/{r}.safetensors", Config=transfer_config())
                times["raw_up"].append(time.perf_counter() - t)

                t = time.perf_counter()
                versions.append(publish_adapter(settings, adapter, name="bench", aliases=[]).version)
                times["publish"].append(time.perf_counter() - t)

                t = time.perf_counter()
                client.download_file("bench", f"raw/{r}.safetensors", str(tmp / f"raw-{r}"),
                                     Config=transfer_config())
                times["raw_down"].append(time.perf_counter() - t)

                t = time.perf_counter()
                pull_adapter(f"bench=={versions[-1]}", settings=settings, dest=tmp / "cache")
                times["pull"].append(time.perf_counter() - t)
                (tmp / f"raw-{r}").unlink()

            t = time.perf_counter()
            set_alias(settings, "bench", "latest", versions[-1])
            alias_move = time.perf_counter() - t
            cached = []
            for _ in range(20):
                t = time.perf_counter()
                pull_adapter("bench@latest", settings=settings, dest=tmp / "cache")
                cached.append(time.perf_counter() - t)
            cached_pinned = []
            for _ in range(20):
                t = time.perf_counter()
                pull_adapter(f"bench=={versions[-1]}", settings=settings, dest=tmp / "cache")
                cached_pinned.append(time.perf_counter() - t)

    mb = total / 1e6
    best = {k: min(v) for k, v in times.items()}
    print(f"adapter: {mb:.1f} MB ({args.rounds} alternating rounds, best of each; local rclone serve s3)")
    print(f"{'operation':<34}{'seconds':>9}{'MB/s':>9}{'vs raw':>9}")
    rows = [("raw boto3 upload_file", best["raw_up"], None),
            ("publish_adapter (no alias)", best["publish"], best["raw_up"]),
            ("raw boto3 download_file", best["raw_down"], None),
            ("pull_adapter (cold, verified)", best["pull"], best["raw_down"])]
    for label, secs, raw in rows:
        ratio = f"{raw / secs:.2f}x" if raw else ""
        print(f"{label:<34}{secs:>9.3f}{mb / secs:>9.1f}{ratio:>9}")
    print(f"{'alias move (lock path)':<34}{alias_move:>9.3f}")
    print(f"{'cached pull NAME@ALIAS (median)':<34}{statistics.median(cached) * 1000:>8.1f}ms"
          f"   max {max(cached) * 1000:.1f} ms")
    print(f"{'cached pull NAME==VERSION (median)':<34}{statistics.median(cached_pinned) * 1000:>8.2f}ms")
    print("all rounds (s): " + ", ".join(f"{k}=" + "/".join(f"{x:.2f}" for x in v) for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
