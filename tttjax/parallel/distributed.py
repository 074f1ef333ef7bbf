"""Multi-host start-up: JAX's distributed runtime from the environment (launch/, clusters, one
process), with bounded waits; and what its key-value store tells a watchdog: a preemption notice
(SIGTERM anywhere in the job), a process that stopped answering.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import jax

log = logging.getLogger(__name__)

# where JAX's preemption sync manager records a SIGTERM received by any process (the notice's time;
# xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc)
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
HEARTBEAT_DIR = "tttjax/heartbeat/"
# JAX's own heartbeat timeout is this much longer than ours: our watchdog names the lost process in
# one line and exits first; JAX's (which aborts the process) is the backstop if ours cannot run
JAX_HEARTBEAT_MARGIN_S = 30
DEFAULT_TIMEOUTS = {"initialization_timeout_s": 300, "heartbeat_timeout_s": 60, "shutdown_timeout_s": 300}
_connected = False  # initialize() has returned: the client may be used (from another thread too)


def initialize_distributed(timeouts=None) -> None:
    """Start JAX's distributed runtime, always (one process too: Orbax's preemption notice needs it).

    In order:
    * explicit: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID, optional
      JAX_LOCAL_DEVICE_IDS "0,1"), as launch/local.py and launch/slurm.py set them; cluster
      auto-detection is switched off so SLURM's per-task GPU binding does not override them;
    * a cluster JAX detects itself: Cloud TPU VMs / pods (metadata server), GKE, SLURM (srun),
      Open MPI; under srun with one task per node every local GPU stays visible;
    * otherwise one local process on a free localhost port (skipped, with a warning, when JAX is
      already in use in this process: then SIGTERM cannot trigger a preemption checkpoint).
    `timeouts` is the run config's `distributed` block (DEFAULT_TIMEOUTS when None): the wait for
    every process to connect, the heartbeat after which a silent process is lost (JAX's own is
    JAX_HEARTBEAT_MARGIN_S longer), the wait for the others at a normal exit. CPU processes
    exchange collectives over gloo.
    """
    global _connected
    if jax.distributed.is_initialized():
        _connected = True
        return
    env = os.environ
    limits = {**DEFAULT_TIMEOUTS, **(dict(timeouts) if timeouts is not None else {})}
    timeout = int(limits["initialization_timeout_s"])
    bounded = dict(initialization_timeout=timeout,
                   heartbeat_timeout_seconds=int(limits["heartbeat_timeout_s"]) + JAX_HEARTBEAT_MARGIN_S,
                   shutdown_timeout_seconds=int(limits["shutdown_timeout_s"]))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")),
                                   cluster_detection_method="deactivate", **bounded)
        _connected = True
        return
    cluster = _detected_cluster()
    if cluster is not None:
        kwargs = {}
        one_task_per_node = _slurm_tasks_per_node() == 1 and not env.get("JAX_LOCAL_DEVICE_IDS")
        if cluster.__name__ == "SlurmCluster" and one_task_per_node:
            # JAX binds task i to GPU SLURM_LOCALID; one task per node must see all of them.
            kwargs = dict(coordinator_address=cluster.get_coordinator_address(timeout, env.get("JAX_COORDINATOR_PORT")),
                          num_processes=cluster.get_process_count(), process_id=cluster.get_process_id(),
                          cluster_detection_method="deactivate")
        log.info("jax.distributed: %s detected", cluster.__name__)
        jax.distributed.initialize(**bounded, **kwargs)
        _connected = True
        return
    if _backend_in_use():  # JAX already in use in this process (tests, notebooks)
        log.warning("jax.distributed not started: JAX's backend is already initialised; a SIGTERM will stop "
                    "this process without a preemption checkpoint")
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0,
                               cluster_detection_method="deactivate", **bounded)
    _connected = True


def connected() -> bool:
    """Whether JAX's distributed runtime is up (`initialize_distributed` returned): a thread must not
    call its client earlier (an RPC before the connection completes aborts the process)."""
    return _connected and jax.distributed.is_initialized()


def _client():
    """JAX's distributed runtime client (its key-value store), or None before `connected()`."""
    if not connected():
        return None
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):  # private API moved: nothing to poll
        return None


def preemption_noticed() -> bool:
    """Whether any process of the job has received a preemption notice (SIGTERM), as JAX recorded it."""
    client = _client()
    if client is None:
        return False
    try:
        return bool(client.key_value_try_get(PREEMPTION_NOTICE_KEY))
    except Exception:  # NOT_FOUND: no notice (the client raises for a missing key)
        return False


class Heartbeats:
    """Each process's liveness in JAX's key-value store, beside JAX's own heartbeats: a process whose
    counter has not moved for `timeout_s`, or a coordinator that does not answer for as long, is
    lost. `beat()` is called every second or so by a watchdog thread; it returns what is lost, in
    words, or None. A collective waiting for a lost process never returns; this lets the others
    end with a line naming it (JAX's own timeout aborts the process without one)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.me, self.count = jax.process_index(), jax.process_count()
        self.counter = 0
        self.seen: dict[int, tuple[str, float]] = {}  # process -> (its last value, when it changed)
        self.unanswered_since: float | None = None

    def beat(self) -> str | None:
        client, now = _client(), time.monotonic()
        if client is None or self.count == 1:
            return None
        self.counter += 1
        try:
            client.key_value_set(f"{HEARTBEAT_DIR}{self.me}", str(self.counter), allow_overwrite=True)
            values = dict(client.key_value_dir_get(HEARTBEAT_DIR))
        except Exception as e:  # the coordinator (process 0) is gone or unreachable
            self.unanswered_since = self.unanswered_since or now
            if now - self.unanswered_since > self.timeout_s:
                return (f"the coordinator (process 0 of {self.count}) has not answered for "
                        f"{now - self.unanswered_since:.0f} s ({' '.join(str(e).split())[:120]})")
            return None
        self.unanswered_since = None
        for key, value in values.items():
            process = int(key.rsplit("/", 1)[-1])
            if self.seen.get(process, (None,))[0] != value:
                self.seen[process] = (value, now)
        for process, (_, changed) in sorted(self.seen.items()):
            if process != self.me and now - changed > self.timeout_s:
                return f"process {process} of {self.count} has sent no heartbeat for {now - changed:.0f} s"
        return None


def _backend_in_use() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not, initialize() will say
        return False


def _detected_cluster():
    """The cluster environment `jax.distributed.initialize()` would auto-detect, or None."""
    try:
        from jax._src import clusters
    except ImportError:  # private module moved: fall back to env hints
        hints = ("SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                 "OMPI_MCA_orte_hnp_uri")
        return type("EnvCluster", (), {}) if any(h in os.environ for h in hints) else None
    for cluster in clusters.ClusterEnv._cluster_types:
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            if cluster.is_env_present():
                return cluster
        except Exception:  # a probe (e.g. a metadata query) failed: not that cluster
            continue
    return None


def _slurm_tasks_per_node() -> int:
    value = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "0"
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError:
        return 0
