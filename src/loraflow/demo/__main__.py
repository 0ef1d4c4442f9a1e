"""`python -m loraflow.demo` (what `make demo` runs): the whole pipeline offline, on the embedded default.

Uses the local object store (`LORAFLOW_HOME/s3`, served on loopback for the run), prepares the demo assets
(SmolLM2-135M-Instruct and 400 real IMDB reviews) and puts them into the bucket, runs the Prefect
`retrain` flow once on the packaged demo.yaml (which trains from their s3:// URIs), prints the
published version, its metrics and the `loraflow pull` command, stops what it started, and prints
where the wall time went."""

from __future__ import annotations

import argparse
import json
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


def printed_pull_command(result: dict, settings) -> str:
    """The pull command as a user can run it in a new shell: plain when a command with no endpoint
    configured falls back to the local store, as the demo used; else naming the store."""
    from loraflow.settings import load_settings
    from loraflow.storage.client import uses_local_store

    command = f"loraflow pull {result['name']}=={result['version']}"
    # What a new shell's command would resolve to (this environment, no --set).
    if settings.storage.endpoint_url == "local" and not uses_local_store(load_settings().storage):
        command += " --set storage.endpoint_url=local"
    return command


def describe_outputs(result: dict, settings) -> None:
    """Where the demo's results are, and the generations the model card holds, side by side."""
    from loraflow.registry import pull_adapter

    if not result.get("version"):
        return
    folder = pull_adapter(f"{result['name']}=={result['version']}", settings=settings)
    print(f"\nthe version, verified, in the local cache: {folder}")
    print(f"  model card   {folder / 'README.md'}")
    print(f"  metrics      {folder / 'metrics.json'}")
    if (folder / "loss_curve.png").is_file():
        print(f"  loss curve   {folder / 'loss_curve.png'}")
    metrics = json.loads((folder / "metrics.json").read_text())
    gens = metrics.get("generations") or []
    if gens:
        print("\ngenerations (greedy, fixed prompts): base model -> adapter")
        clip = lambda text: " ".join(str(text).split())[:70]  # noqa: E731
        for g in gens:
            print(f"  {g['prompt']!r}")
            print(f"    base    {clip(g.get('base_text', ''))}")
            print(f"    adapter {clip(g.get('text', ''))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraflow.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help=f"settings file (default {DEMO_CONFIG})")
    parser.add_argument("--set", dest="overrides", metavar="K=V", action="append", default=[],
                        help="override one setting, e.g. --set training.max_steps=2 (repeatable)")
    parser.add_argument("--assets-only", action="store_true",
                        help="only build the demo model and reviews and put them into the object store")
    args = parser.parse_args(argv)

    from loraflow.cli.run import format_summary, import_retrain_flow, prefect_environment
    from loraflow.errors import LoraflowError
    from loraflow.log import setup_console

    setup_console(logging.INFO)
    prefect_environment()
    started = time.perf_counter()
    try:
        from loraflow.demo.assets import demo_assets
        from loraflow.settings import load_settings

        t = time.perf_counter()
        assets = demo_assets()
        # Unless told otherwise, the demo uses the local object store (LORAFLOW_HOME/s3), served for
        # this process; versions and `champion` stay there for every later command.
        settings = load_settings(args.config or DEMO_CONFIG, args.overrides)
        if settings.storage.endpoint_url is None:
            settings = load_settings(args.config or DEMO_CONFIG, args.overrides, storage={"endpoint_url": "local"})
        upload_assets(settings, assets)
        assets_s = time.perf_counter() - t
        if args.assets_only:
            print(f"demo model and reviews are in the object store: {settings.model.name_or_path}, {settings.data.source}")
            return 0
        retrain = import_retrain_flow()
        t = time.perf_counter()
        from loraflow.stopping import prefect_api, stop_on_signals

        with stop_on_signals("the demo"), prefect_api():
            result = retrain(settings)
            flow_wall = time.perf_counter() - t
            if result.get("skipped"):
                # Nothing changed since the champion was trained (an earlier demo): no GPU time spent.
                print(f"\n{result['message']} ({flow_wall:.1f} s); `--set registry.force=true` retrains anyway")
                return 0
            result["pull_command"] = printed_pull_command(result, settings)
            # The schedule's next run, right away: the change check ends it in seconds, publishing nothing.
            t = time.perf_counter()
            again = retrain(settings)
            skipped_s = time.perf_counter() - t
    except LoraflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    timings = result.get("timings") or {}
    parts = {
        "preparation (assets + dataset)": assets_s + timings.get("preparation", 0.0),
        "training": timings.get("training", 0.0),
        "evaluation": timings.get("evaluation", 0.0),
        "publishing (+ promotion gate)": timings.get("publishing", 0.0) + timings.get("gate", 0.0),
    }
    # Everything else inside the flow call: ephemeral API start-up, flow/task run bookkeeping, artifacts.
    parts["Prefect overhead"] = flow_wall - sum(v for k, v in parts.items() if not k.startswith("preparation")) \
        - timings.get("preparation", 0.0)
    total = time.perf_counter() - started
    print()
    print(format_summary(result))
    describe_outputs(result, settings)
    print(f"\nwall time {total:.0f} s:")
    for name, seconds in parts.items():
        print(f"  {name:<32} {seconds:7.1f} s  ({100 * seconds / total:4.1f}%)")
    other = total - sum(parts.values())
    print(f"  {'other (imports, S3 server)':<32} {other:7.1f} s  ({100 * other / total:4.1f}%)")
    if again.get("skipped"):
        print(f"\na second run right after it: {again['message']} ({skipped_s:.1f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
