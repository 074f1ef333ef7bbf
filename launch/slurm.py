"""Train on a SLURM GPU cluster: write an sbatch script that runs tttjax on every node with srun.

    python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=a3 --time=24:00:00 --chain=3 \
        -- --config=configs/moshi_7b_ttt.py --config.run_dir=/shared/runs/7b --config.mesh.fsdp=-1

The script exports the coordinator (the allocation's first node, port derived from the job id)
and the process count; each srun task sets JAX_PROCESS_ID from SLURM_PROCID, which
tttjax.parallel.distributed.initialize_distributed reads. --per=host: one process per node seeing all its
GPUs (JAX_LOCAL_DEVICE_IDS=0..G-1); --per=gpu: one process per GPU (JAX_LOCAL_DEVICE_IDS=
SLURM_LOCALID). Both give the same global mesh.

Preemption and time limits: `--signal=TERM@<signal_s>` makes SLURM send SIGTERM to every task
before the time limit (and a preempting scheduler sends it too): the processes agree on a step,
save it and exit 0. `--requeue` lets the scheduler requeue a preempted job; a requeued, restarted
(--max_restarts, same allocation) or chained (--chain N: N jobs, each starting after the previous
ends) job re-runs the same command, which resumes from run_dir's latest checkpoint (run_dir must
be on a filesystem every node shares). A finished run exits at once ("nothing to do").

--dry_run prints the script and the sbatch command(s); otherwise the script is written to
--script and submitted (or, with --here inside an allocation, run directly with bash).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from launch.common import quote, split_args, train_command
from tttjax import cli
from tttjax.errors import UserError


def parse(argv):
    own, train_args = split_args(argv)
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--per", choices=("host", "gpu"), default="host", help="one process per node or per GPU")
    p.add_argument("--job_name", default="tttjax")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--time", default="", help="time limit, e.g. 24:00:00")
    p.add_argument("--cpus_per_task", type=int, default=0)
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--output", default="logs/%x-%j.out", help="SLURM log file pattern")
    p.add_argument("--signal_s", type=int, default=300, help="SIGTERM this many seconds before the time limit")
    p.add_argument("--no_requeue", action="store_true", help="do not let the scheduler requeue a preempted job")
    p.add_argument("--max_restarts", type=int, default=0, help="re-run srun in the same allocation after a failure")
    p.add_argument("--chain", type=int, default=1, help="submit N jobs, each after the previous one ends")
    p.add_argument("--port", type=int, default=0, help="coordinator port; 0 = 61440 + job id %% 4096 (as JAX)")
    p.add_argument("--python", default="python", help="interpreter on the compute nodes")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before training, e.g. 'source ~/venv/bin/activate' (repeatable)")
    p.add_argument("--workdir", default="", help="directory on the nodes holding this repo; default: the current one")
    p.add_argument("--script", default="", help="where to write the sbatch script; default: logs/<job_name>.sbatch")
    p.add_argument("--here", action="store_true", help="inside an allocation (salloc): run the script with bash now")
    p.add_argument("--dry_run", action="store_true", help="print the script and the commands, run nothing")
    args = p.parse_args(own)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.chain < 1:
        p.error("--nodes, --gpus_per_node and --chain must be >= 1")
    return args, train_args


def render(args, train_args) -> str:
    tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
    sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks_per_node}",
              f"--gpus-per-node={args.gpus_per_node}", f"--output={args.output}", "--open-mode=append",
              f"--signal=TERM@{args.signal_s}"]
    sbatch += [] if args.no_requeue else ["--requeue"]
    sbatch += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("partition", "account", "qos", "time",
                                                                      "cpus_per_task") if getattr(args, k)]
    sbatch += ["--exclusive"] if args.exclusive else []
    local_ids = "$SLURM_LOCALID" if args.per == "gpu" else ",".join(str(i) for i in range(args.gpus_per_node))
    port = str(args.port) if args.port else "$((61440 + SLURM_JOB_ID % 4096))"
    task = (f"export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS={local_ids}; "
            f"exec {quote(train_command(args.python, train_args))}")
    workdir = args.workdir or os.getcwd()
    lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sbatch] + [
        "# Written by `python -m launch.slurm`. Re-running it (requeue, restart, chain) resumes from the",
        "# run's latest checkpoint.",
        "set -uo pipefail",
        f"cd {shlex.quote(workdir)}",
        *args.setup,
        f'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}"',
        "export JAX_NUM_PROCESSES=$SLURM_NTASKS",
        'echo "coordinator $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES processes, '
        'restart count ${SLURM_RESTART_COUNT:-0}"',
        "rc=1",
        f"for attempt in $(seq 0 {args.max_restarts}); do",
        f"  srun --kill-on-bad-exit=1 --ntasks-per-node={tasks_per_node} bash -c {shlex.quote(task)}",
        "  rc=$?",
        '  if [ "$rc" -eq 0 ]; then exit 0; fi',
        '  echo "attempt $attempt failed with exit code $rc"',
        "done",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    args, train_args = parse(argv)
    script = render(args, train_args)
    path = Path(args.script or f"logs/{args.job_name}.sbatch")
    if args.here:
        commands = [["bash", str(path)]]
    else:
        commands = [["sbatch", str(path)]] + [
            ["sbatch", "--dependency=afterany:{previous}", str(path)] for _ in range(args.chain - 1)]
    if args.dry_run:
        print(f"# {path}\n{script}")
        for c in commands:
            print(quote(c).replace("{previous}", "<previous job id>"))
        return 0
    if args.here and "SLURM_JOB_ID" not in os.environ:
        raise UserError("--here needs an allocation (run it inside salloc / an sbatch job)")
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"[launch.slurm] wrote {path}", flush=True)
    if args.here:
        return subprocess.call(commands[0])
    previous = ""
    for c in commands:
        c = [c[0], "--parsable"] + [w.replace("{previous}", previous) for w in c[1:]]
        done = subprocess.run(c, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        previous = done.stdout.strip().split(";")[0]
        print(f"[launch.slurm] submitted job {previous}: {quote(c)}", flush=True)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
