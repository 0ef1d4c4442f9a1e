"""A multi-node training run as a Kubernetes Indexed Job: rendered from the run's settings
(`cluster.*`), checked against the Kubernetes client's own models, created and waited for by the
gpu pool's flow run (tasks/cluster.py).

Why an Indexed Job and not Kubeflow's PyTorchJob: it is core Kubernetes (batch/v1, GA since 1.24),
so it needs no operator or CRD installed and is validated by the same client and schema as any
other object; torchrun's c10d rendezvous does what the operator would add (every pod runs the same
command; node 0's stable hostname `<job>-0.<job>`, through a headless Service of the Job's name, is
the rendezvous endpoint). The training operator (v1) also sets `MASTER_ADDR`/`WORLD_SIZE`/`RANK`
for its own launcher conventions, which loraflow does not need, and is being replaced by Kubeflow
Trainer v2's TrainJob.

What the nodes get: the run's whole spec (settings JSON; settings never hold secrets) in
`LORAFLOW_RUN_SPEC` with the rendezvous already decided in it (`cluster.rdzv_endpoint`, `rdzv_id`
= the run key), credentials from the Secret `cluster.storage_secret`, node rank = the pod's
completion index, a scratch emptyDir (checkpoints come from object storage on every start) and a
memory-backed /dev/shm. The Job is created suspended, the Service is created owned by it (deleted
with it), then the Job is resumed: no pod starts before node 0's name resolves.

Only the `kubernetes` extra (`pip install 'loraflow[kubernetes]'`: kubernetes_asyncio, the client
Prefect's Kubernetes worker uses) is needed, and only to check, create and wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError, LoraflowError, TrainingError
from loraflow.launch import RDZV_PORT, SPEC_ENV
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.settings import Settings

log = get_logger("cluster")

LABEL = "loraflow.io/job"  # on the Job's pods; the Service selects them by it
RUN_KEY_ANNOTATION = "loraflow.io/run-key"
SCRATCH = "/scratch"
# Waiting reasons a container never recovers from by itself: the run fails at once, naming it.
FATAL_WAITING = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                           "CreateContainerError"})
_INSTALL = "pip install 'loraflow[kubernetes]'"
# Errors that fail the same way on a retry (as tasks/_retry.py's PERMANENT), by the name a node reports.
DETERMINISTIC = frozenset({"ConfigError", "DataError", "ModelError", "TrainingError", "IntegrityError", "ValueError",
                           "TypeError", "KeyError", "MemoryError"})
_RANK_ERROR = re.compile(r"training failed on rank \d+ \(torchrun exit -?\d+\): (\w+):")
_NODE_ERROR = re.compile(r"(\w+): (?!training failed on rank|training under torchrun failed)")


class ClusterError(LoraflowError):
    """The Kubernetes API could not be reached, or failed a request: the next attempt may succeed."""


class NodeLost(ClusterError):
    """A node of the Job died of something other than its own error (killed, evicted, out of
    memory, its machine gone): the run's next attempt resumes from the newest stored checkpoint."""


def job_name(run_key: str) -> str:
    """A DNS label (pods are `<name>-<index>`, at most 63 characters), unique per attempt."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_key.lower()).strip("-")[:24].strip("-") or "run"
    return f"loraflow-{slug}-{secrets.token_hex(3)}"


def node_spec(settings: Settings, run_key: str, name: str) -> Settings:
    """The spec every node follows: the run's, with the rendezvous decided (node 0 of the Job)."""
    endpoint = f"{name}-0.{name}:{RDZV_PORT}"
    return settings.model_copy(update={"cluster": settings.cluster.model_copy(
        update={"rdzv_endpoint": endpoint, "rdzv_id": settings.cluster.rdzv_id or run_key})})


def render(settings: Settings, run_key: str, name: str | None = None) -> list[dict[str, Any]]:
    """[headless Service, Indexed Job] for `settings.cluster.nnodes` nodes of the run `run_key`."""
    c = settings.cluster
    if c.image is None:
        raise ConfigError("cluster.image: unset; training on several nodes runs in pods of this image "
                          "(loraflow with a CUDA build of torch)")
    if c.nnodes < 2:
        raise ConfigError(f"cluster.nnodes={c.nnodes}: a Kubernetes Job is for 2 or more nodes; one node trains "
                          "in the flow run's own pod")
    nproc = settings.training.nproc_per_node
    if nproc != "auto" and c.gpus_per_node and nproc != c.gpus_per_node:
        raise ConfigError(f"training.nproc_per_node={nproc} with cluster.gpus_per_node={c.gpus_per_node}: one training "
                          "process per GPU; leave nproc_per_node at auto")
    name = name or job_name(run_key)
    labels = {"app.kubernetes.io/name": "loraflow", "app.kubernetes.io/component": "training", LABEL: name}
    spec_json = node_spec(settings, run_key, name).model_dump_json()
    gpus = {"nvidia.com/gpu": str(c.gpus_per_node)} if c.gpus_per_node else {}
    container = {
        "name": "node",
        "image": c.image,
        "command": ["python", "-m", "loraflow.launch", "node", "--output", f"{SCRATCH}/run", "--run-key", run_key,
                    "--node-rank", "$(NODE_RANK)"],
        "env": [
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": SPEC_ENV, "value": spec_json},
            {"name": "LORAFLOW_HOME", "value": f"{SCRATCH}/home"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        ],
        "envFrom": [{"secretRef": {"name": c.storage_secret}}],
        "ports": [{"name": "c10d", "containerPort": RDZV_PORT}],
        "resources": {"requests": {"cpu": c.cpu, "memory": c.memory, **gpus},
                      "limits": {"memory": c.memory, **gpus}},
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}, {"name": "dshm", "mountPath": "/dev/shm"}],
        # The node's one-line error (loraflow.launch writes it there), else its log's tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "subdomain": name,  # with the headless Service of that name: <name>-<index>.<name> resolves
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}}],
    }
    if c.gpus_per_node:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if c.service_account:
        pod_spec["serviceAccountName"] = c.service_account
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": c.namespace, "labels": labels},
        "spec": {"clusterIP": "None", "selector": {LABEL: name},
                 # Node 0's name must resolve before it is Ready: the others dial it as they start.
                 "publishNotReadyAddresses": True,
                 "ports": [{"name": "c10d", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": c.namespace, "labels": labels,
                     "annotations": {RUN_KEY_ANNOTATION: run_key}},
        "spec": {
            "completionMode": "Indexed", "completions": c.nnodes, "parallelism": c.nnodes,
            "backoffLimit": c.backoff_limit,
            "suspend": True,  # resumed once the Service exists (run_job)
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return [service, job]


def check(manifests: list[dict[str, Any]]) -> None:
    """Each manifest read into the Kubernetes client's model of its kind and written back must be
    itself: a misspelt or misplaced field is dropped by the models, a wrong type fails them.
    ConfigError naming the object and the field."""
    asyncio.run(_round_trip(manifests))


async def _round_trip(manifests: list[dict[str, Any]]) -> None:
    try:
        from kubernetes_asyncio.client import ApiClient
    except ImportError:
        raise ConfigError(f"cluster.nnodes > 1 trains through Kubernetes: {_INSTALL}") from None
    async with ApiClient() as api:  # the client's models need its ApiClient, which needs a loop
        for manifest in manifests:
            kind = f"V1{manifest['kind']}"
            where = f"{manifest['kind']} {manifest['metadata'].get('name')}"
            try:
                model = api._ApiClient__deserialize(manifest, kind)  # the client's own reader
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
            differs = _first_difference(manifest, api.sanitize_for_serialization(model))
            if differs:
                raise ConfigError(f"{where}: {differs}: not kept by Kubernetes' {kind} model (a misspelt or "
                                  "misplaced field)")


def _first_difference(want: Any, got: Any, path: str = "") -> str | None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key, value in want.items():
            if key not in got:
                if value is None:
                    continue  # null is absent to the API as to the client
                return f"{path}.{key}".lstrip(".")
            found = _first_difference(value, got[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (a, b) in enumerate(zip(want, got)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(want, (int, float)) and not isinstance(want, bool) and got == str(want):
        return None  # a quantity given as a number (`nvidia.com/gpu: 1`): the client keeps its string form
    return None if want == got else (path.lstrip(".") or "<root>")


# --- waiting ------------------------------------------------------------------------------------

@dataclass
class Progress:
    done: bool = False
    failure: str | None = None  # one line
    lost: bool = False  # the failure is a lost node, not the run's own error
    finished: bool = False  # the Job itself has ended (its pods' logs stay until its TTL)
    line: str = ""  # what the nodes are doing, for the log


def _index(pod: Any) -> str:
    return ((pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index")
            or (pod.metadata.labels or {}).get("batch.kubernetes.io/job-completion-index") or "?")


def _terminated(pod: Any) -> Any:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.state and status.state.terminated:
            return status.state.terminated
    return None


def _pod_failure(pod: Any) -> tuple[str, bool]:
    """(one line on why the pod failed, whether it was lost rather than the run's own error)."""
    where = f"pod {pod.metadata.name} (node {_index(pod)})"
    term = _terminated(pod)
    if term is None:  # evicted, its node gone: no container ever finished
        reason = (pod.status.reason if pod.status else None) or "no container status"
        return f"{where} {reason}: {(pod.status.message if pod.status else None) or 'lost'}", True
    message = (term.message or "").strip().splitlines()
    last = message[-1] if message else ""
    # loraflow.launch writes the node's error as the termination message. Only a deterministic
    # error of the run itself (bad settings or data, a diverged loss) is the run's own; a kill
    # (137), OOMKilled, or a rank that lost its peers (gloo/NCCL, the rendezvous) is a lost node.
    cause = _RANK_ERROR.search(last) or _NODE_ERROR.match(last)
    own = term.exit_code in (1, 2) and term.reason != "OOMKilled" and bool(cause) and cause.group(1) in DETERMINISTIC
    detail = f": {last}" if last else ""
    return f"{where} exited {term.exit_code} ({term.reason or 'Error'}){detail}", not own


def job_progress(job: Any, pods: list[Any], *, pending_timeout_s: float, now: datetime) -> Progress:
    """Where a Job (a V1Job) and its pods (V1Pods) stand: done, failed (one line), or running.
    `now`: an aware datetime (a pod's age is measured from its creation timestamp)."""
    name = f"{job.metadata.namespace}/{job.metadata.name}"
    status = job.status
    conditions = {c.type: c for c in (status.conditions or []) if c.status == "True"} if status else {}
    failed_pods = [p for p in pods if p.status and p.status.phase == "Failed"]
    if "Complete" in conditions:
        return Progress(done=True, line=f"job {name}: all nodes finished")
    if "Failed" in conditions:
        cond = conditions["Failed"]
        first = min(failed_pods, key=lambda p: _terminated(p).finished_at.timestamp() if _terminated(p)
                    and _terminated(p).finished_at else float("inf"), default=None)
        pod_line, lost = _pod_failure(first) if first else ("", True)
        return Progress(failure=f"kubernetes job {name} failed ({cond.reason or 'Failed'}"
                                f"{': ' + cond.message if cond.message else ''})" + (f": {pod_line}" if pod_line else ""),
                        lost=lost, finished=True)
    for pod in pods:
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in FATAL_WAITING:
                return Progress(failure=f"kubernetes job {name}: pod {pod.metadata.name} (node {_index(pod)}) cannot "
                                        f"start: {waiting.reason}: {waiting.message or ''}".rstrip(": "))
        created = pod.metadata.creation_timestamp
        if pod.status and pod.status.phase == "Pending" and created and \
                (now - created).total_seconds() > pending_timeout_s:
            why = next((c.message for c in (pod.status.conditions or []) if c.type == "PodScheduled"
                        and c.status == "False" and c.message), "still pending")
            return Progress(failure=f"kubernetes job {name}: pod {pod.metadata.name} (node {_index(pod)}) not running "
                                    f"after {pending_timeout_s:.0f} s (cluster.pending_timeout_s): {why}")
    phases = [p.status.phase if p.status else "Unknown" for p in pods]
    line = (f"job {name}: {phases.count('Running')}/{job.spec.parallelism} nodes running, "
            f"{phases.count('Pending')} pending, {phases.count('Succeeded')} done")
    if failed_pods:  # the Job's backoffLimit lets it start them again
        line += f", {len(failed_pods)} failed ({_pod_failure(failed_pods[0])[0]})"
    return Progress(line=line)


async def run_job(settings: Settings, run_key: str, *, poll_s: float = 10.0, report_every_s: float = 300.0) -> str:
    """Create the run's Job (and Service) and wait for it; returns the Job's name. Raises
    TrainingError (the nodes' own error) or NodeLost (killed, evicted, lost) in one line, keeping
    the failed Job for `kubectl logs` until its TTL (a day); a Job that cannot start, or a wait
    that is cancelled, deletes the Job and its pods."""
    try:
        from kubernetes_asyncio import client, config
    except ImportError:
        raise ConfigError(f"cluster.nnodes > 1 trains through Kubernetes: {_INSTALL}") from None
    from loraflow.checkpoints import latest_checkpoint

    service, job = render(settings, run_key)
    await _round_trip([service, job])
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # KUBECONFIG as it is now (the client reads it once, at its import).
            await config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (config.ConfigException, OSError) as exc:
            raise ConfigError("no Kubernetes cluster to create the training job in: this is not a pod with a "
                              f"service account, and the kubeconfig (KUBECONFIG or ~/.kube/config) fails: {exc}") from None
    async with client.ApiClient() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        try:
            created = await batch.create_namespaced_job(namespace, job)
        except client.ApiException as exc:
            raise _api_error(exc, f"create job {namespace}/{name}") from None
        except Exception as exc:  # aiohttp's connection errors, DNS, TLS: the API is not reachable
            raise ClusterError(f"kubernetes API {api.configuration.host} unreachable while creating job "
                               f"{namespace}/{name}: {type(exc).__name__}: {exc}") from None
        keep = False
        try:
            service["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                       "uid": created.metadata.uid}]
            await core.create_namespaced_service(namespace, service)
            await batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": False}})
            log.info("created kubernetes job %s/%s: %d nodes x %s, rendezvous %s-0.%s:%d; `kubectl -n %s logs -f "
                     "job/%s` follows node 0", namespace, name, settings.cluster.nnodes,
                     f"{settings.cluster.gpus_per_node} GPU(s)", name, name, RDZV_PORT, namespace, name)
            started = last_report = time.monotonic()
            said, misses = "", 0
            while True:
                try:
                    current = await batch.read_namespaced_job(name, namespace)
                    pods = (await core.list_namespaced_pod(namespace, label_selector=f"{LABEL}={name}")).items
                    misses = 0
                except Exception as exc:  # noqa: BLE001 - an API server restarting must not end hours of training
                    misses += 1
                    if misses * poll_s > 600 or (isinstance(exc, client.ApiException) and exc.status in (401, 403, 404)):
                        raise
                    log.warning("kubernetes API: reading job %s/%s failed (%s); trying again in %.0f s", namespace,
                                name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, poll_s)
                    await asyncio.sleep(poll_s)
                    continue
                progress = job_progress(current, pods, pending_timeout_s=settings.cluster.pending_timeout_s,
                                        now=datetime.now(timezone.utc))
                if progress.done:
                    log.info("%s", progress.line)
                    return name
                if progress.failure:
                    if progress.finished:  # kept for `kubectl logs` until its TTL
                        keep = True
                    raise (NodeLost if progress.lost else TrainingError)(progress.failure)
                now = time.monotonic()
                if progress.line != said or now - last_report >= report_every_s:
                    stored = await asyncio.to_thread(latest_checkpoint, settings.storage, run_key)
                    log.info("%s; newest stored checkpoint: %s (%.0f min)", progress.line,
                             f"step {stored.step}" if stored else "none yet", (now - started) / 60)
                    said, last_report = progress.line, now
                await asyncio.sleep(poll_s)
        except client.ApiException as exc:
            await _delete(batch, name, namespace)
            raise _api_error(exc, f"watch job {namespace}/{name}") from None
        except BaseException:
            # Stuck, cancelled or timed out: no pod outlives the wait (the Service goes with the Job).
            if not keep:
                await _delete(batch, name, namespace)
            raise


async def _delete(batch: Any, name: str, namespace: str) -> None:
    try:
        await batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
    except Exception as exc:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not delete kubernetes job %s/%s: %s", namespace, name, exc)


def _api_error(exc: Any, what: str) -> LoraflowError:
    """One line from an ApiException: refusals (RBAC, quota, a bad object) are permanent."""
    try:
        message = json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        message = exc.reason
    line = f"kubernetes API refused to {what}: {exc.status} {exc.reason}: {message}"
    return ClusterError(line) if exc.status is None or exc.status >= 500 or exc.status == 429 else ConfigError(line)

