"""`loraflow serve NAME@ALIAS` (the reference service that follows an alias) and
`loraflow export NAME[@ALIAS|==VERSION] --merged DIR`."""

from __future__ import annotations

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    serve = sub.add_parser("serve", help="serve NAME@ALIAS over HTTP (OpenAI completions), hot-swapping on moves")
    serve.add_argument("ref", metavar="NAME@ALIAS", help="the alias to follow")
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
    from loraflow.serving.service import ServeOptions, Service

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 0-65535")
    options = ServeOptions(interval=args.poll_interval, canary_docs=args.canary_docs,
                           canary_tolerance=args.canary_tolerance, max_tokens_limit=args.max_tokens_limit,
                           dest=args.cache)
    service = Service(args.ref, settings_from_args(args), options)
    app = create_app(service)
    get_logger("serving").info("following %s every %gs; http://%s:%d/v1/completions", args.ref,
                               options.interval, args.host, args.port)
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
