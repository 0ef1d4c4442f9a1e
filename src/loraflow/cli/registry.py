"""`loraflow publish | promote | versions | history | rollback | pull | gc`: the adapter registry from
the shell. Alias moves made here are recorded with the CLI user (user@host) as the actor."""

from __future__ import annotations

import json

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    publish = sub.add_parser("publish", help="upload an adapter directory as a new version")
    publish.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                         help="the adapter directory (adapter_config.json + safetensors)")
    publish.add_argument("--name", help="adapter name (default: registry.adapter_name)")
    publish.add_argument("--alias", dest="aliases", action="append", metavar="ALIAS",
                         help="alias to move to the new version (repeatable; default: registry.aliases)")
    publish.add_argument("--no-alias", action="store_true", help="move no alias")
    publish.add_argument("--extra", metavar="JSON", help="JSON object merged into the manifest")
    add_settings_args(publish)
    publish.set_defaults(handler=_publish)

    promote = sub.add_parser("promote", help="point an alias at a version (also how to roll back)")
    promote.add_argument("name", metavar="NAME", help="adapter name")
    promote.add_argument("version", metavar="VERSION", help="the version the alias will point at")
    promote.add_argument("--alias", default=None, help="alias to move (default: registry.promote_alias)")
    promote.add_argument("--expect", metavar="VERSION",
                         help="only move it if it points at VERSION now ('none': only if it does not exist)")
    promote.add_argument("--reason", default="", help="why (recorded in the alias history)")
    add_settings_args(promote)
    promote.set_defaults(handler=_promote)

    history = sub.add_parser("history", help="every move of an alias, newest first")
    history.add_argument("name", metavar="NAME", help="adapter name")
    history.add_argument("--alias", default=None, help="alias (default: registry.promote_alias)")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    add_settings_args(history)
    history.set_defaults(handler=_history)

    rollback = sub.add_parser("rollback", help="move an alias back to its previous version (or --to VERSION)")
    rollback.add_argument("name", metavar="NAME", help="adapter name")
    rollback.add_argument("--alias", default=None, help="alias (default: registry.promote_alias)")
    rollback.add_argument("--to", metavar="VERSION", help="the version to move it to (default: its previous one)")
    rollback.add_argument("--reason", default=None, help="why (recorded in the alias history)")
    add_settings_args(rollback)
    rollback.set_defaults(handler=_rollback)

    versions = sub.add_parser("versions", help="list the versions of an adapter with metrics and aliases")
    versions.add_argument("name", metavar="NAME", help="adapter name")
    versions.add_argument("--json", action="store_true", help="machine-readable output")
    add_settings_args(versions)
    versions.set_defaults(handler=_versions)

    pull = sub.add_parser("pull", help="download a verified adapter into the local cache")
    pull.add_argument("ref", metavar="NAME[@ALIAS|==VERSION]", help="what to pull (NAME alone: NAME@latest)")
    pull.add_argument("--dest", metavar="DIR", help="cache root (default: LORAFLOW_HOME/adapters)")
    add_settings_args(pull)
    pull.set_defaults(handler=_pull)

    gc = sub.add_parser("gc", help="remove leftovers of failed publishes and, with --keep-last, old versions")
    gc.add_argument("name", metavar="NAME", help="adapter name")
    gc.add_argument("--grace", type=float, metavar="SECONDS",
                    help="only remove leftovers older than this (default: registry.gc_grace_seconds)")
    gc.add_argument("--keep-last", type=int, metavar="N",
                    help="delete complete versions except the newest N, aliased ones and recent champions")
    gc.add_argument("--keep-champions", type=int, metavar="K",
                    help="with --keep-last: also keep what held the champion alias in its last K moves "
                         "(default: registry.gc_keep_champions)")
    gc.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    gc.add_argument("--checkpoint-grace", type=float, metavar="SECONDS",
                    help="also remove training checkpoints of NAME's runs idle this long (failed or abandoned "
                         "runs; default: registry.gc_checkpoint_grace_seconds)")
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
    _emit("published", published.name, version=published.version, metrics=published.manifest.get("metrics"),
          aliases=published.aliases)
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
    set_alias(settings, args.name, alias, args.version, expected_version=expected,
              reason=args.reason or "promoted by hand")
    _flush_events()
    print(f"{args.name}@{alias} -> {args.version}")
    return 0


def _emit(event: str, name: str, **kwargs) -> None:
    from loraflow import events

    events.emit(event, name, **kwargs)
    _flush_events()


def _flush_events() -> None:
    from loraflow import events

    events.flush()  # this process is about to exit; queued events would be lost


def _history(args) -> int:
    from loraflow.registry import alias_history

    settings = settings_from_args(args)
    alias = args.alias or settings.registry.promote_alias
    rows = alias_history(settings, args.name, alias)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [["WHEN", "FROM", "TO", "ACTOR", "REASON"]]
    for r in rows:
        table.append([r.get("at") or "?", r.get("from") or "-", r["to"], r.get("actor") or "?", r.get("reason") or ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip())
    return 0


def _rollback(args) -> int:
    from loraflow.registry import rollback_alias

    settings = settings_from_args(args)
    alias = args.alias or settings.registry.promote_alias
    before, after = rollback_alias(settings, args.name, alias, to=args.to, reason=args.reason)
    _flush_events()
    print(f"{args.name}@{alias}: {before} -> {after} (rolled back)")
    return 0


def _versions(args) -> int:
    from loraflow.errors import StorageError
    from loraflow.registry import list_versions

    settings = settings_from_args(args)
    rows = list_versions(settings, args.name)
    if not rows:
        from loraflow.registry.catalog import open_registry
        from loraflow.registry.existence import require_adapter

        require_adapter(*open_registry(settings, args.name))
        raise StorageError(f"no versions of adapter {args.name!r} in s3://{settings.storage.bucket}"
                           f"/{settings.storage.prefix.strip('/') + '/' if settings.storage.prefix.strip('/') else ''}"
                           f"adapters/{args.name}/")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    metric_keys = [k for k in ("adapter_ppl", "base_ppl", "eval_loss", "final_loss")
                   if any(k in r["metrics"] for r in rows)]
    gated = any(r.get("gate") for r in rows)
    header = ["VERSION", "CREATED", *[k.upper() for k in metric_keys], *(["GATE"] if gated else []), "SIZE", "ALIASES"]
    table = [header]
    for r in rows:
        metrics = [_fmt(r["metrics"].get(k)) for k in metric_keys]
        gate = [_gate(r.get("gate"), r["metrics"].get("eval_documents"))] if gated else []
        table.append([r["version"], r["created_at"] or "?", *metrics, *gate, _size(r["size"]), ",".join(r["aliases"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _gate(gate: dict | None, documents: int | None = None) -> str:
    """`promote vs base 0.91 [0.89,0.93] vs champion 0.97 [0.95,0.99] 50 documents (69 chunks)`:
    the verdict, the perplexity-ratio intervals it rests on and what they were measured over (the
    gate's `documents` counts chunks; the eval set's documents come from the metrics)."""
    from loraflow.cli.run import eval_units

    if not gate:
        return "-"
    parts = [gate.get("verdict", "?")]
    for label, key in (("vs base", "vs_base"), ("vs champion", "vs_champion")):
        interval = gate.get(key) or {}
        if interval.get("ppl_ratio"):
            low, mid, high = interval["ppl_ratio"]
            parts.append(f"{label} {mid:.3f} [{low:.3f},{high:.3f}]")
    over = eval_units(documents, gate.get("documents"))
    if over:
        parts.append(over)
    return " ".join(parts)


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
    from loraflow.errors import ConfigError
    from loraflow.registry import gc_adapter

    if args.keep_champions is not None and args.keep_last is None:
        raise ConfigError("--keep-champions only applies with --keep-last N")
    settings = settings_from_args(args)
    _require_something_to_collect(settings, args.name)
    report = gc_adapter(settings, args.name, grace_seconds=args.grace, dry_run=args.dry_run,
                        keep_last=args.keep_last, keep_champions=args.keep_champions)
    verb = "would remove" if args.dry_run else "removed"
    if args.keep_last is not None:
        print(f"{'would delete' if args.dry_run else 'deleted'} {len(report.deleted_versions)} version(s), "
              f"kept {len(report.retained)}")
        for version in report.deleted_versions:
            print(f"  - {version}")
        for version, why in report.retained.items():
            print(f"  = {version}  ({why})")
    uploads = f"{report.aborted_uploads} stale multipart upload(s)"
    if report.aborted_uploads and report.aborted_bytes is not None:
        uploads += f" ({_size(report.aborted_bytes)})"
    print(f"{verb} {len(report.removed_versions)} incomplete version(s) ({report.removed_objects} objects, "
          f"{_size(report.removed_bytes)}), {report.removed_locks} expired lock claim(s), "
          f"{'would abort' if args.dry_run else 'aborted'} {uploads}, "
          f"{report.removed_temp_files} orphaned upload temp file(s) ({_size(report.removed_temp_bytes)}); "
          f"kept {len(report.kept_recent)} recent incomplete version(s)")
    for version in report.removed_versions:
        print(f"  {version}")
    _gc_checkpoints(args, verb)
    return 0


def _require_something_to_collect(settings, name: str) -> None:
    """`gc NAME` for a NAME with neither objects in the registry nor training checkpoints is a typo."""
    from loraflow.checkpoints import abandoned_runs
    from loraflow.registry.catalog import open_registry
    from loraflow.registry.existence import adapter_exists, require_adapter
    from loraflow.registry.layout import check_name
    from loraflow.storage.local import served_root

    store, layout = open_registry(settings, check_name(name))
    if adapter_exists(store, layout):
        return
    root = served_root(settings.storage)
    if root is not None and (root / store.bucket / layout.root).is_dir():
        return  # only rclone's hidden upload files are left of it: gc removes those
    stale, recent = abandoned_runs(settings.storage, 0)
    if any(run.adapter_name == name for run in (*stale, *recent)):
        return
    require_adapter(store, layout)


def _gc_checkpoints(args, verb: str) -> None:
    from loraflow.registry.gc import gc_checkpoints

    report = gc_checkpoints(settings_from_args(args), args.name, grace_seconds=args.checkpoint_grace,
                            dry_run=args.dry_run)
    print(f"{verb} checkpoints of {len(report.removed_runs)} failed or abandoned training run(s) of {args.name}; "
          f"kept {len(report.kept_recent)} recent run(s)")
    for run in report.removed_runs:
        print(f"  checkpoints/{run['run_key']}/  {run['objects']} objects, {run['bytes']} bytes, idle {run['idle_s']} s")
    if report.unattributed:
        print(f"left {len(report.unattributed)} abandoned run(s) whose checkpoints name no adapter "
              "(written before loraflow recorded it); delete them by hand if they are yours:")
        for run in report.unattributed:
            print(f"  checkpoints/{run['run_key']}/  {run['objects']} objects, {run['bytes']} bytes, "
                  f"idle {run['idle_s']} s")
