"""`loraflow publish | promote | versions | pull | gc`: the adapter registry from the shell."""

from __future__ import annotations

import json

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    publish = sub.add_parser("publish", help="upload an adapter directory as a new version")
    publish.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    publish.add_argument("--name", help="adapter name (default: registry.adapter_name)")
    publish.add_argument("--alias", dest="aliases", action="append", metavar="ALIAS",
                         help="alias to move to the new version (repeatable; default: registry.aliases)")
    publish.add_argument("--no-alias", action="store_true", help="move no alias")
    publish.add_argument("--extra", metavar="JSON", help="JSON object merged into the manifest")
    add_settings_args(publish)
    publish.set_defaults(handler=_publish)

    promote = sub.add_parser("promote", help="point an alias at a version (also how to roll back)")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--alias", default=None, help="alias to move (default: registry.promote_alias)")
    promote.add_argument("--expect", metavar="VERSION",
                         help="only move it if it points at VERSION now ('none': only if it does not exist)")
    add_settings_args(promote)
    promote.set_defaults(handler=_promote)

    versions = sub.add_parser("versions", help="list the versions of an adapter with metrics and aliases")
    versions.add_argument("name", metavar="NAME")
    versions.add_argument("--json", action="store_true", help="machine-readable output")
    add_settings_args(versions)
    versions.set_defaults(handler=_versions)

    pull = sub.add_parser("pull", help="download a verified adapter into the local cache")
    pull.add_argument("ref", metavar="NAME[@ALIAS|==VERSION]")
    pull.add_argument("--dest", metavar="DIR", help="cache root (default: LORAFLOW_HOME/adapters)")
    add_settings_args(pull)
    pull.set_defaults(handler=_pull)

    gc = sub.add_parser("gc", help="remove leftovers of failed publishes")
    gc.add_argument("name", metavar="NAME")
    gc.add_argument("--grace", type=float, metavar="SECONDS",
                    help="only remove leftovers older than this (default: registry.gc_grace_seconds)")
    gc.add_argument("--dry-run", action="store_true")
    add_settings_args(gc)
    gc.set_defaults(handler=_gc)


def _publish(args) -> int:
    from loraflow.errors import ConfigError
    from loraflow.registry import publish_adapter

    extra = None
    if args.extra:
        try:
            extra = json.loads(args.extra)
        except ValueError:
            raise ConfigError("--extra: not valid JSON") from None
        if not isinstance(extra, dict):
            raise ConfigError("--extra: expected a JSON object")
    aliases = [] if args.no_alias else args.aliases
    published = publish_adapter(settings_from_args(args), args.adapter_dir, name=args.name,
                                aliases=aliases, extra=extra)
    print(f"{published.name}=={published.version}  {published.uri}")
    for alias, target in published.aliases.items():
        note = "" if target == published.version else f" (stays on newer {target})"
        print(f"  {alias} -> {target}{note}")
    return 0


def _promote(args) -> int:
    from loraflow.registry import ANY, set_alias

    settings = settings_from_args(args)
    alias = args.alias or settings.registry.promote_alias
    expected = ANY if args.expect is None else (None if args.expect.lower() == "none" else args.expect)
    set_alias(settings, args.name, alias, args.version, expected_version=expected)
    print(f"{args.name}@{alias} -> {args.version}")
    return 0


def _versions(args) -> int:
    from loraflow.errors import StorageError
    from loraflow.registry import list_versions

    settings = settings_from_args(args)
    rows = list_versions(settings, args.name)
    if not rows:
        raise StorageError(f"no versions of adapter {args.name!r} in s3://{settings.storage.bucket}"
                           f"/{settings.storage.prefix.strip('/') + '/' if settings.storage.prefix.strip('/') else ''}"
                           f"adapters/{args.name}/")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    metric_keys = [k for k in ("adapter_ppl", "base_ppl", "eval_loss", "final_loss")
                   if any(k in r["metrics"] for r in rows)]
    header = ["VERSION", "CREATED", *[k.upper() for k in metric_keys], "SIZE", "ALIASES"]
    table = [header]
    for r in rows:
        metrics = [_fmt(r["metrics"].get(k)) for k in metric_keys]
        table.append([r["version"], r["created_at"] or "?", *metrics, _size(r["size"]), ",".join(r["aliases"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.4g}" if isinstance(value, (int, float)) else str(value))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pull(args) -> int:
    from loraflow.registry import pull_adapter

    print(pull_adapter(args.ref, settings=settings_from_args(args), dest=args.dest))
    return 0


def _gc(args) -> int:
    from loraflow.registry import gc_adapter

    report = gc_adapter(settings_from_args(args), args.name, grace_seconds=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(report.removed_versions)} incomplete version(s) ({report.removed_objects} objects), "
          f"{report.removed_locks} expired lock claim(s), {report.aborted_uploads} stale multipart upload(s); "
          f"kept {len(report.kept_recent)} recent incomplete version(s)")
    for version in report.removed_versions:
        print(f"  {version}")
    return 0
