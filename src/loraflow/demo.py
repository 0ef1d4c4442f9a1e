"""`python -m loraflow.demo` (what `make demo` runs): the whole pipeline offline, on the embedded default.

Starts a local S3 server (rclone) on loopback, prepares the demo assets (SmolLM2-135M-Instruct and
400 real IMDB reviews), runs the Prefect `retrain` flow once on deployments/configs/demo.yaml,
prints the published version, its metrics and the `loraflow pull` command, stops what it started,
and prints where the wall time went."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraflow.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="settings file (default deployments/configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", metavar="K=V", action="append", default=[])
    args = parser.parse_args(argv)

    from loraflow.cli.run import format_summary, import_retrain_flow, prefect_environment, repo_root
    from loraflow.errors import LoraflowError
    from loraflow.log import setup_console

    setup_console(logging.INFO)
    prefect_environment()
    started = time.perf_counter()
    try:
        from loraflow.assets import demo_assets
        from loraflow.paths import cache_dir
        from loraflow.registry.server import LocalS3Server
        from loraflow.settings import load_settings

        t = time.perf_counter()
        assets = demo_assets()
        assets_s = time.perf_counter() - t
        config = args.config or repo_root() / "deployments" / "configs" / "demo.yaml"
        # The demo's registry lives under LORAFLOW_HOME, so versions and `champion` survive between demos.
        with LocalS3Server(cache_dir("demo-s3"), "127.0.0.1:0", buckets=("loraflow",)) as server:
            settings = load_settings(config, args.overrides, storage=server.storage_overrides("loraflow"))
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
