"""`python -m loraflow.demo` (what `make demo` runs): the whole pipeline offline, on the embedded default.

Starts the local S3 server (rclone) on loopback over `LORAFLOW_HOME/s3`, prepares the demo assets
(SmolLM2-135M-Instruct and 400 real IMDB reviews) and puts them into the bucket, runs the Prefect
`retrain` flow once on the packaged demo.yaml (which trains from their s3:// URIs), prints the
published version, its metrics and the `loraflow pull` command, stops what it started, and prints
where the wall time went."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
BUCKET = "loraflow"


def upload_assets(settings, assets) -> None:
    """Put the demo model and data where demo.yaml points (s3://loraflow/models/..., /datasets/...),
    unless the bucket already holds exactly these files (same sha256s in the manifest)."""
    from loraflow.hashing import sha256_file
    from loraflow.storage.client import parse_s3_uri
    from loraflow.storage.store import Store
    from loraflow.storage.transfer import local_files, read_manifest, upload_dir

    for local, uri, kind in ((assets.model_dir, settings.model.name_or_path, "model"),
                             (assets.data_dir, settings.data.source, "data")):
        bucket, key = parse_s3_uri(uri)
        store = Store(settings.storage, bucket)
        remote = read_manifest(store, key, kind)
        wanted = {rel: sha256_file(path) for rel, path in local_files(local, kind, recursive=True).items()}
        if remote is None or {e["name"]: e["sha256"] for e in remote["files"]} != wanted:
            upload_dir(store, local, key, kind, recursive=True)
            print(f"uploaded {local} -> {uri}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraflow.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help=f"settings file (default {DEMO_CONFIG})")
    parser.add_argument("--set", dest="overrides", metavar="K=V", action="append", default=[])
    args = parser.parse_args(argv)

    from loraflow.cli.run import format_summary, import_retrain_flow, prefect_environment
    from loraflow.errors import LoraflowError
    from loraflow.log import setup_console

    setup_console(logging.INFO)
    prefect_environment()
    started = time.perf_counter()
    try:
        from loraflow.demo.assets import demo_assets
        from loraflow.paths import cache_dir
        from loraflow.demo.s3server import LocalS3Server
        from loraflow.settings import load_settings

        t = time.perf_counter()
        assets = demo_assets()
        assets_s = time.perf_counter() - t
        # The demo's object store lives under LORAFLOW_HOME, so versions and `champion` survive
        # between demos (and `loraflow storage serve` serves the same root).
        with LocalS3Server(cache_dir("s3"), "127.0.0.1:0", buckets=(BUCKET,)) as server:
            os.environ.update(server.env())  # boto3's credential chain finds the local key here
            settings = load_settings(args.config or DEMO_CONFIG, args.overrides,
                                     storage=server.storage_overrides(BUCKET))
            t = time.perf_counter()
            upload_assets(settings, assets)
            assets_s += time.perf_counter() - t
            retrain = import_retrain_flow()
            t = time.perf_counter()
            result = retrain(settings)
            flow_wall = time.perf_counter() - t
    except LoraflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    timings = result["timings"]
    parts = {
        "preparation (assets + dataset)": assets_s + timings["preparation"],
        "training": timings["training"],
        "evaluation": timings["evaluation"],
        "publishing (+ promotion gate)": timings["publishing"] + timings["gate"],
    }
    # Everything else inside the flow call: ephemeral API start-up, flow/task run bookkeeping, artifacts.
    parts["Prefect overhead"] = flow_wall - sum(v for k, v in parts.items() if not k.startswith("preparation")) \
        - timings["preparation"]
    total = time.perf_counter() - started
    print()
    print(format_summary(result))
    print(f"\nmodel {assets.model_dir}\ndata  {assets.data_dir}")
    print(f"\nwall time {total:.0f} s:")
    for name, seconds in parts.items():
        print(f"  {name:<32} {seconds:7.1f} s  ({100 * seconds / total:4.1f}%)")
    other = total - sum(parts.values())
    print(f"  {'other (imports, S3 server)':<32} {other:7.1f} s  ({100 * other / total:4.1f}%)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
