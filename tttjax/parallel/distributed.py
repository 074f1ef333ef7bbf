"""Multi-host start-up: JAX's distributed runtime from the environment (launch/, clusters, one process)."""

from __future__ import annotations

import logging
import os
import socket

import jax

log = logging.getLogger(__name__)


def initialize_distributed() -> None:
    """Start JAX's distributed runtime, always (one process too: Orbax's preemption notice needs it).

    In order:
    * explicit: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID, optional
      JAX_LOCAL_DEVICE_IDS "0,1"), as launch/local.py and launch/slurm.py set them; cluster
      auto-detection is switched off so SLURM's per-task GPU binding does not override them;
    * a cluster JAX detects itself: Cloud TPU VMs / pods (metadata server), GKE, SLURM (srun),
      Open MPI; under srun with one task per node every local GPU stays visible;
    * otherwise one local process on a free localhost port (skipped, with a warning, when JAX is
      already in use in this process: then SIGTERM cannot trigger a preemption checkpoint).
    JAX_INITIALIZATION_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
    CPU processes exchange collectives over gloo.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    timeout = int(env.get("JAX_INITIALIZATION_TIMEOUT", "300"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")),
                                   cluster_detection_method="deactivate", initialization_timeout=timeout)
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
        jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
        return
    if _backend_in_use():  # JAX already in use in this process (tests, notebooks)
        log.warning("jax.distributed not started: JAX's backend is already initialised; a SIGTERM will stop "
                    "this process without a preemption checkpoint")
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0,
                               cluster_detection_method="deactivate", initialization_timeout=timeout)


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
