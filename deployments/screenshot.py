"""Screenshot the Prefect UI in headless Chromium: the latest completed `retrain` flow run (task graph
and logs) beside its published-version artifact (verdict, perplexities, pull command, loss curve),
side by side in one PNG.

    python deployments/screenshot.py [--api-url URL] [--flow-run ID] [--out docs/prefect-flow-run.png]

Needs Chromium (Debian: `apt-get install chromium`). The UI is a single-page app: Chromium's
virtual time budget lets its scripts fetch the run from the API before the picture is taken.
Nothing leaves the machine: background networking, sync, QUIC and component updates are off."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


async def latest_completed_run(flow_name: str) -> tuple[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, \
        FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.END_TIME_DESC, limit=1)
    if not runs:
        raise SystemExit(f"no completed {flow_name!r} flow run on this server")
    return str(runs[0].id), runs[0].name


async def version_artifact_id(flow_run_id: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    async with get_client() as client:
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["markdown"])))
    # A run also records its spec as markdown: the version artifact is the one whose key ends "-version".
    versions = [a for a in artifacts if (a.key or "").endswith("-version")]
    return str(versions[0].id) if versions else None


def capture(url: str, out: Path, *, width: int = 1400, height: int = 1100, wait_ms: int = 15000,
            chromium: str | None = None) -> Path:
    chromium = chromium or find_chromium()
    if chromium is None:
        raise SystemExit("chromium not found (Debian: apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraflow-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    parser.add_argument("--flow-run", help="flow run id (default: the latest completed retrain run)")
    parser.add_argument("--flow", default="retrain")
    # The Artifacts tab is hidden until the run has loaded, so ?tab=Artifacts falls back to Logs;
    # the artifact gets its own page (panel) instead.
    parser.add_argument("--tab", default="Logs", help="flow run page tab: Logs, Parameters, Details, ...")
    parser.add_argument("--out", type=Path, default=Path("docs/prefect-flow-run.png"))
    parser.add_argument("--width", type=int, default=1280, help="width of each panel")
    parser.add_argument("--height", type=int, default=1150)
    args = parser.parse_args(argv)

    os.environ["PREFECT_API_URL"] = args.api_url
    base = args.api_url.rstrip("/").removesuffix("/api")
    run_id = args.flow_run
    if run_id is None:
        run_id, name = asyncio.run(latest_completed_run(args.flow))
        print(f"flow run {name} ({run_id})")
    artifact = asyncio.run(version_artifact_id(run_id))
    if artifact is None:
        raise SystemExit(f"flow run {run_id} has no version artifact (key ending -version)")
    with tempfile.TemporaryDirectory(prefix="loraflow-shots-") as tmp:
        run_png = capture(f"{base}/runs/flow-run/{run_id}?tab={args.tab}", Path(tmp, "run.png"),
                          width=args.width, height=args.height)
        artifact_png = capture(f"{base}/artifacts/artifact/{artifact}", Path(tmp, "artifact.png"),
                               width=args.width, height=args.height)
        side_by_side([run_png, artifact_png], args.out)
    print(f"saved {args.out}")
    return 0


def side_by_side(images: list[Path], out: Path) -> Path:
    from PIL import Image  # Pillow comes with matplotlib

    panels = [Image.open(p).convert("RGB") for p in images]
    gap = 8
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)),
                       (60, 60, 60))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
