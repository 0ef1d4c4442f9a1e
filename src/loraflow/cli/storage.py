"""`loraflow storage serve | env`: the local object store (rclone serve s3 over LORAFLOW_HOME/s3).

loraflow commands need neither: with no endpoint configured (or `storage.endpoint_url: local`) they
serve the same store for their own duration. `serve` is for other S3 clients and for a stack of
processes sharing one endpoint (`make up`); `env` prints the variables those clients need."""

from __future__ import annotations

import signal
import threading

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    storage = sub.add_parser("storage", help="the local S3-compatible object store")
    ssub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    serve = ssub.add_parser("serve", help="serve the local store as S3 (rclone serve s3) until Ctrl-C/SIGTERM")
    serve.add_argument("--root", default=None, metavar="DIR", help="data directory (default: LORAFLOW_HOME/s3)")
    serve.add_argument("--addr", default="127.0.0.1:9000", metavar="HOST:PORT", help="where to listen")
    add_settings_args(serve)
    serve.set_defaults(handler=_serve)
    env = ssub.add_parser("env", help="print the variables an S3 client needs for the local store (its key included)")
    env.add_argument("--endpoint", default="http://127.0.0.1:9000", metavar="URL",
                     help="where `loraflow storage serve` listens (default http://127.0.0.1:9000)")
    env.set_defaults(handler=_env)


def _serve(args) -> int:
    from loraflow.paths import ensure_dir
    from loraflow.storage.local import LocalS3Server, local_credentials, local_root

    settings = settings_from_args(args)
    root = ensure_dir(args.root, "--root") if args.root else local_root()
    access, secret = local_credentials()
    server = LocalS3Server(root, args.addr, access, secret, buckets=(settings.storage.bucket,))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"serving {server.root} as S3 on {server.endpoint_url} (bucket {settings.storage.bucket!r} ready)")
        print("other S3 clients (aws, boto3, rclone) on this machine:")
        print(f'  eval "$(loraflow storage env --endpoint {server.endpoint_url})"')
        print("loraflow commands need nothing: with no endpoint configured they use this store's files directly")
        print("stop with Ctrl-C", flush=True)
        while not stop.wait(0.5):
            if not server.running():
                print("error: the S3 server exited unexpectedly")
                return 1
    print("stopped")
    return 0


def _env(args) -> int:
    from loraflow.storage.local import local_credentials

    access, secret = local_credentials()
    # Asked for explicitly, like `aws configure export-credentials`: a loopback-only key of this machine.
    print(f"export AWS_ENDPOINT_URL_S3={args.endpoint}")
    print(f"export AWS_ACCESS_KEY_ID={access}")
    print(f"export AWS_SECRET_ACCESS_KEY={secret}")
    print("export AWS_REGION=us-east-1")
    return 0
