"""`loraflow config show|validate`."""

from __future__ import annotations

import json

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    config = sub.add_parser("config", help="show or validate the resolved settings")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved settings (secrets masked)")
    add_settings_args(show)
    show.add_argument("--format", choices=["yaml", "json"], default="yaml", help="output format (default: yaml)")
    show.set_defaults(handler=_show)
    validate = csub.add_parser("validate", help="check a settings file; exit 2 naming each bad field")
    add_settings_args(validate)
    validate.set_defaults(handler=_validate)


def _show(args) -> int:
    data = settings_from_args(args).public_dict()
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _validate(args) -> int:
    settings_from_args(args)
    print(f"ok: {args.config or 'defaults'} is valid")
    return 0
