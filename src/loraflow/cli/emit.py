"""`loraflow emit data-landed SOURCE`: tell Prefect that new training data landed, as the custom
event `loraflow.data.landed` on resource `loraflow.data.<SOURCE>`. A deployment trigger on that
event (deployments/prefect.yaml, `retrain-on-new-data`) starts a retrain, whose change check then
decides whether anything really changed. Needs a Prefect API (PREFECT_API_URL)."""

from __future__ import annotations

import os

from loraflow.errors import ConfigError

DATA_LANDED = "loraflow.data.landed"


def register(sub) -> None:
    emit = sub.add_parser("emit", help=f"emit a loraflow event to Prefect ({DATA_LANDED}) for deployment triggers")
    kinds = emit.add_subparsers(dest="event", required=True, metavar="EVENT")
    landed = kinds.add_parser("data-landed", help=f"new data at SOURCE: emits {DATA_LANDED}")
    landed.add_argument("source", metavar="SOURCE", help="where the data landed, e.g. s3://bucket/reviews/")
    landed.add_argument("--adapter", metavar="NAME", help="the adapter it is meant for (payload only)")
    landed.set_defaults(handler=_data_landed)


def _data_landed(args) -> int:
    from loraflow.cli.run import prefect_environment

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("loraflow emit: PREFECT_API_URL is not set; events go to a Prefect server")
    prefect_environment()
    from prefect.events import emit_event

    from loraflow import events

    sent = emit_event(event=DATA_LANDED,
                      resource={"prefect.resource.id": f"loraflow.data.{args.source}",
                                "prefect.resource.name": args.source},
                      payload={"source": args.source, "adapter": args.adapter})
    events.flush()  # this process exits next; the events worker would drop what it still holds
    if sent is None:
        raise ConfigError(f"loraflow emit: Prefect did not accept {DATA_LANDED} (is PREFECT_API_URL right?)")
    print(f"emitted {DATA_LANDED} for {args.source} (event {sent.id})")
    return 0
