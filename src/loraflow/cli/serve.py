"""`loraflow serve REF [REF ...]` (the reference service: adapters of one base, aliases followed) and
`loraflow export NAME[@ALIAS|==VERSION] --merged DIR`."""

from __future__ import annotations

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    serve = sub.add_parser("serve", help="serve adapters of one base over HTTP (OpenAI completions and chat), "
                                         "batched, hot-swapping followed aliases on moves")
    serve.add_argument("refs", metavar="REF", nargs="*",
                       help="NAME@ALIAS (followed: each move is canaried and swapped in) or NAME==VERSION (pinned); "
                            "a request's model picks one by NAME, NAME@ALIAS or NAME==VERSION")
    serve.add_argument("--adapters-file", metavar="FILE",
                       help="more refs, one per line (# comments); served after those on the command line")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--poll-interval", type=float, default=10.0, metavar="SECONDS",
                       help="how often the alias is checked (one HEAD request) (default: 10)")
    serve.add_argument("--canary-docs", metavar="FILE",
                       help="held-back documents for the canary perplexity, one per line or .jsonl with 'text'")
    serve.add_argument("--canary-tolerance", type=float, default=1.0, metavar="X",
                       help="refuse a version whose canary perplexity exceeds its recorded adapter_ppl "
                            "x (1 + X) (default: 1.0)")
    serve.add_argument("--max-tokens-limit", type=int, default=512, metavar="N",
                       help="largest max_tokens a request may ask for (default: 512)")
    serve.add_argument("--max-batch", type=int, default=16, metavar="N",
                       help="sequences generated together, whatever their adapter; 1 = one at a time (default: 16)")
    serve.add_argument("--max-loaded", type=int, default=8, metavar="N",
                       help="adapter versions kept loaded; beyond, the least recently used unpinned one is "
                            "unloaded and loaded again when asked for (default: 8)")
    serve.add_argument("--cache", metavar="DIR", help="adapter cache root (default: LORAFLOW_HOME/adapters)")
    add_settings_args(serve)
    serve.set_defaults(handler=_serve)

    export = sub.add_parser("export", help="write base model + adapter merged, for engines without LoRA support")
    export.add_argument("ref", metavar="NAME[@ALIAS|==VERSION]", help="the adapter version to merge")
    export.add_argument("--merged", required=True, metavar="DIR", help="output directory (safetensors + tokenizer)")
    add_settings_args(export)
    export.set_defaults(handler=_export)


def _serve(args) -> int:
    from loraflow.errors import ConfigError

    try:
        # loraflow.serving imports these only once the app is built: ask here, for one clear line.
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ConfigError(f"loraflow serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'loraflow[serve]'") from None
    from loraflow.log import get_logger
    from loraflow.serving.app import create_app
    from loraflow.serving.service import ServeOptions, Service, read_refs_file

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 0-65535")
    refs = list(args.refs) + (read_refs_file(args.adapters_file) if args.adapters_file else [])
    if not refs:
        raise ConfigError("serve: name at least one adapter, NAME@ALIAS or NAME==VERSION (or --adapters-file FILE)")
    options = ServeOptions(interval=args.poll_interval, canary_docs=args.canary_docs,
                           canary_tolerance=args.canary_tolerance, max_tokens_limit=args.max_tokens_limit,
                           dest=args.cache, max_batch=args.max_batch, max_loaded=args.max_loaded)
    service = Service(refs, settings_from_args(args), options)
    if len(refs) > 1:
        service.check_bases()
    app = create_app(service)
    get_logger("serving").info("serving %s (aliases checked every %gs); http://%s:%d/v1/completions",
                               ", ".join(r.ref for r in service.routes), options.interval, args.host, args.port)
    service.start()
    try:
        # The access log would print a line per completion; /metrics counts them instead.
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        service.stop()
    return 0


def _export(args) -> int:
    from loraflow.export import export_merged

    print(export_merged(args.ref, args.merged, settings=settings_from_args(args)))
    return 0
