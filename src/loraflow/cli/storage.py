"""`loraflow storage serve`: the local S3-compatible server (rclone serve s3) in the foreground."""

from __future__ import annotations

import os
import signal
import threading

from loraflow.cli import add_settings_args, settings_from_args


def register(sub) -> None:
    storage = sub.add_parser("storage", help="local S3-compatible storage")
    ssub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    serve = ssub.add_parser("serve", help="serve a directory as S3 (rclone serve s3) until Ctrl-C/SIGTERM")
    serve.add_argument("--root", default=None, metavar="DIR", help="data directory (default: LORAFLOW_HOME/s3)")
    serve.add_argument("--addr", default="127.0.0.1:9000", metavar="HOST:PORT")
    add_settings_args(serve)
    serve.set_defaults(handler=_serve)


def _serve(args) -> int:
    from loraflow.paths import cache_dir, ensure_dir
    from loraflow.demo.s3server import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, LocalS3Server

    settings = settings_from_args(args)
    storage = settings.storage
    # The server accepts the key this shell's AWS_* variables carry, so a shell configured for it
    # talks to it unchanged; otherwise the loopback development default.
    access = os.environ.get("AWS_ACCESS_KEY_ID") or DEFAULT_ACCESS_KEY
    secret_set = bool(os.environ.get("AWS_SECRET_ACCESS_KEY"))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"] if secret_set else DEFAULT_SECRET_KEY
    root = str(ensure_dir(args.root, "--root")) if args.root else str(cache_dir("s3"))
    server = LocalS3Server(root, args.addr, access, secret, buckets=(storage.bucket,))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"serving {server.root} as S3 on {server.endpoint_url} (bucket {storage.bucket!r} ready)")
        print("point loraflow and other S3 clients at it:")
        print(f"  export AWS_ENDPOINT_URL_S3={server.endpoint_url}")
        print(f"  export AWS_ACCESS_KEY_ID={access}")
        if secret_set:
            print("  export AWS_SECRET_ACCESS_KEY=...   # the secret already in this shell's environment")
        else:
            print("  export AWS_SECRET_ACCESS_KEY=...   # the local development default: "
                  "loraflow.demo.s3server.DEFAULT_SECRET_KEY")
        print(f"  export LORAFLOW_STORAGE__BUCKET={storage.bucket}")
        print("stop with Ctrl-C", flush=True)
        while not stop.wait(0.5):
            if not server.running():
                print("error: the S3 server exited unexpectedly")
                return 1
    print("stopped")
    return 0
