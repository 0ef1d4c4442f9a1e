"""`loraflow run [--config FILE] [--set K=V ...]`: run the `retrain` flow once.

Against the Prefect server in PREFECT_API_URL when set, else an ephemeral local one. The flow is
`loraflow.flows.retrain` (the repository's top-level `flows/` folder, shipped in the package); the
handler imports it lazily, since the library itself never imports Prefect."""

from __future__ import annotations

import json
import os
import time

from loraflow.cli import add_settings_args, settings_from_args

# Prefect's ephemeral server needs ~20 s to start on 2 cores, and its default start-up timeout is 20 s.
EPHEMERAL_STARTUP_TIMEOUT_S = "180"
DEFAULT_DEPLOYMENT = "retrain/retrain-imdb"


def register(sub) -> None:
    run = sub.add_parser("run", help="run the retrain flow once: on the Prefect server's workers when "
                                     "PREFECT_API_URL is set, else in this process (ephemeral Prefect)")
    add_settings_args(run)
    run.add_argument("--json", action="store_true", help="print the flow's result as JSON")
    run.add_argument("--force", action="store_true",
                     help="retrain even if nothing changed since the champion was trained (registry.force=true)")
    run.add_argument("--local", action="store_true",
                     help="run the flow in this process even when a Prefect server is configured")
    run.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, metavar="FLOW/DEPLOYMENT",
                     help=f"the deployment to submit to when a server is configured (default {DEFAULT_DEPLOYMENT})")
    run.set_defaults(handler=_run)


def prefect_environment() -> None:
    """Process-wide Prefect settings for an in-process flow run; must precede `import prefect`."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
    # The library logs outside flow runs too (pull, publish); those lines have no run to go to.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)


def import_retrain_flow():
    """`loraflow.flows.retrain.retrain`, imported only when a command runs it (importing Prefect
    takes seconds)."""
    from loraflow.flows.retrain import retrain

    return retrain


def format_summary(result: dict) -> str:
    m = result.get("metrics", {})
    verdict = "promoted to champion" if result["promoted"] else "published, NOT promoted"
    lines = [
        f"{result['name']}=={result['version']}: {verdict}",
        f"  {result['reason']}",
        f"  location     {result['uri']}",
        f"  perplexity   base {m.get('base_ppl', float('nan')):.2f} -> adapter {m.get('adapter_ppl', float('nan')):.2f}",
        f"  training     {m.get('global_step')} steps, {m.get('train_tokens') or 0:,} tokens, "
        f"{float(m.get('train_time_s') or 0):.1f} s, {float(m.get('tokens_per_s') or 0):.0f} tokens/s",
    ]
    evaluated = eval_units(m.get("eval_documents"), (result.get("gate") or {}).get("documents"))
    if evaluated:
        tokens = (result.get("gate") or {}).get("tokens") or m.get("eval_tokens")
        lines.append(f"  evaluation   {evaluated}" + (f", {tokens:,} tokens" if isinstance(tokens, int) else ""))
    lines.append(f"  use it       {result['pull_command']}")
    return "\n".join(lines)


def eval_units(documents: int | None, chunks: int | None) -> str | None:
    """`50 documents (69 chunks)`: what the eval set holds and what the gate resampled. The gate's
    bootstrap counts chunks of up to data.max_length tokens (a long document is several), which
    is not the number of documents."""
    if documents and chunks and documents != chunks:
        return f"{documents} documents ({chunks} chunks)"
    if documents:
        return f"{documents} documents"
    return f"{chunks} chunks" if chunks else None


def _run(args) -> int:
    if args.force:
        args.overrides.append("registry.force=true")
    prefect_environment()
    if os.environ.get("PREFECT_API_URL") and not args.local:
        from loraflow.cli.submit import submit_and_follow

        return submit_and_follow(args.config, args.overrides, args.deployment, as_json=args.json)
    settings = settings_from_args(args)
    from loraflow.stopping import prefect_api, stop_on_signals

    retrain = import_retrain_flow()
    started = time.perf_counter()
    with stop_on_signals("loraflow run"), prefect_api():
        result = retrain(settings)
    result["timings"]["wall (incl. Prefect start-up)"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result.get("skipped"):
        print(result["message"])
    else:
        print(format_summary(result))
    return 0
