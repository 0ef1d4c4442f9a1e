"""The fleet's change check for N unchanged adapters against the local store (target: 100 in <= 10 s).

    .venv/bin/python bench/fleet_change_check.py [--adapters 100] [--home DIR] [--rounds 3]

Sets up, in a LORAFLOW_HOME of its own (a temporary one unless --home names one to keep between
runs), the local store (`storage.endpoint_url: local`: rclone over HOME/s3, as every command
uses it) holding a tiny GPT-2 as `s3://loraflow/bench-fleet/models/tiny-gpt2`, one data source per
adapter (`s3://loraflow/bench-fleet/data/aNNN/`, train.jsonl + test.jsonl) and, for each adapter,
a champion whose manifest records the stamp of exactly those inputs: what a retrain leaves. Then
measures, alternating the two, best and median of --rounds:

* library: `loraflow.changes.check_since_champion` for every adapter, one after the other
  (listing of the data source and of the base model, the champion alias, its manifest);
* flow: the `retrain-fleet` flow in this process (its change check mapped over the adapters as
  Prefect tasks on an API server of its own), its change-check stage and the whole flow run.

Every adapter must come out unchanged (the flow: "0 trained, N skipped, 0 failed"), else it exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fleet_doc(n: int) -> dict:
    return {
        "name": "bench",
        "max_parallel": 2,
        "defaults": {"model": {"name_or_path": "s3://loraflow/bench-fleet/models/tiny-gpt2"},
                     "lora": {"r": 4, "target_modules": ["c_attn", "c_proj"]},
                     "storage": {"endpoint_url": "local", "bucket": "loraflow"}},
        "adapters": [{"name": f"bench-a{i:03d}", "source": f"s3://loraflow/bench-fleet/data/a{i:03d}/"}
                     for i in range(n)],
    }


def _setup(fleet, tmp: Path) -> float:
    """Put the model, the data sources and a champion per adapter into the store; seconds taken.
    Adapters that already have a champion (a kept --home) are left as they are."""
    from loraflow.changes import input_stamp
    from loraflow.demo.tiny_models import make_gpt2_model_dir, make_random_adapter_dir
    from loraflow.registry import get_alias, publish_adapter, set_alias
    from loraflow.storage.store import Store
    from loraflow.storage.transfer import upload_dir

    started = time.perf_counter()
    first = next(iter(fleet.specs.values()))
    store = Store(first.storage)
    if not list(store.list("bench-fleet/models/tiny-gpt2/")):
        upload_dir(store, make_gpt2_model_dir(tmp / "tiny-gpt2", "tiny"), "bench-fleet/models/tiny-gpt2/", "model")
    adapter = make_random_adapter_dir(tmp / "adapter", 0.1, base_model="s3://loraflow/bench-fleet/models/tiny-gpt2")

    def seed(spec) -> bool:
        name = spec.registry.adapter_name
        if get_alias(spec, name, "champion") is not None:
            return False
        prefix = spec.data.source.removeprefix("s3://loraflow/")
        rows = [{"text": f"review {i} for {name}", "label": i % 2} for i in range(8)]
        for split in ("train", "test"):
            store.put_bytes(f"{prefix}{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        published = publish_adapter(spec, adapter, aliases=[], extra={"inputs": input_stamp(spec)})
        set_alias(spec, name, "champion", published.version, expected_version=None, reason="bench/fleet_change_check.py")
        return True

    with ThreadPoolExecutor(8) as pool:
        seeded = sum(pool.map(seed, fleet.specs.values()))
    elapsed = time.perf_counter() - started
    print(f"setup: {seeded} champions seeded ({len(fleet.specs) - seeded} already there) in {elapsed:.1f} s", flush=True)
    return elapsed


def _library_round(fleet) -> float:
    from loraflow.changes import check_since_champion

    started = time.perf_counter()
    for name, spec in fleet.specs.items():
        check = check_since_champion(spec)
        if not check.unchanged:
            raise SystemExit(f"fleet_change_check: {name} is not unchanged: {check.changed}")
    return time.perf_counter() - started


def _flow_round(fleet_file: Path, n: int) -> tuple[float, float]:
    from loraflow.flows.fleet import retrain_fleet

    started = time.perf_counter()
    state = retrain_fleet(str(fleet_file), return_state=True)
    wall = time.perf_counter() - started
    summary = state.result(raise_on_failure=False)
    if not state.is_completed() or state.message != f"0 trained, {n} skipped, 0 failed":
        raise SystemExit(f"fleet_change_check: the fleet run ended {state.type.value}: {state.message}")
    return summary["timings"]["change check"], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100, help="adapters in the fleet (default 100)")
    parser.add_argument("--home", type=Path, help="LORAFLOW_HOME to use and keep (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of each kind (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        home = args.home or tmp / "home"
        os.environ["LORAFLOW_HOME"] = str(home.resolve())
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        # The flow's API: a server of this process's own, with its own database, given time to start on a busy machine.
        if not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
        import yaml

        from loraflow.fleet import load_fleet
        from loraflow.stopping import prefect_api

        fleet_file = tmp / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(_fleet_doc(args.adapters), sort_keys=False))
        fleet = load_fleet(fleet_file)
        where = f"{home}/s3" if args.home else "LORAFLOW_HOME/s3 of a temporary home"
        print(f"fleet_change_check: {args.adapters} adapters, local store {where}; {_cpu()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        _setup(fleet, tmp)
        print("warm-up: one library round (boto3 clients, imports)", flush=True)
        _library_round(fleet)
        library: list[float] = []
        flow_check: list[float] = []
        flow_wall: list[float] = []
        with prefect_api():
            # The first run in a fresh process, as a worker's flow run is (the API's first runs are slower too).
            first_check, first_wall = _flow_round(fleet_file, args.adapters)
            print(f"first fleet flow run in this process: change check {first_check:.2f} s, whole run "
                  f"{first_wall:.2f} s", flush=True)
            for i in range(1, args.rounds + 1):
                library.append(_library_round(fleet))
                check, wall = _flow_round(fleet_file, args.adapters)
                flow_check.append(check)
                flow_wall.append(wall)
                print(f"round {i}/{args.rounds}: library {library[-1]:.2f} s; fleet flow: change check "
                      f"{check:.2f} s, whole run {wall:.2f} s", flush=True)
            time.sleep(3)  # the API records the last task runs' events before it stops (else it logs its cancelled flush)

    def fmt(values: list[float]) -> str:
        return f"best {min(values):6.2f} s  median {statistics.median(values):6.2f} s"

    print(f"\nchange check of {args.adapters} unchanged adapters against the local store "
          f"(load average {os.getloadavg()[0]:.2f} at the end):")
    print(f"  library, one after the other        {fmt(library)}")
    print(f"  retrain-fleet flow: change check    {fmt(flow_check)}   (mapped tasks)")
    print(f"  retrain-fleet flow: whole run       {fmt(flow_wall)}   (incl. summary artifact)")
    print(f"  retrain-fleet flow: first run       change check {first_check:.2f} s, whole run {first_wall:.2f} s")
    worst = max(first_wall, *flow_wall)
    print(f"  target <= 10 s for the whole fleet run: {'met' if worst <= 10.0 else 'NOT met'} (slowest run {worst:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
