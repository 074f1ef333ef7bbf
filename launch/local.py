"""N training processes on this machine, wired together with jax.distributed.

    python -m launch.local --num_processes=2 --devices_per_process=4 -- \
        --config=configs/tiny.py --config.mesh.dcn_data=2 --config.mesh.data=1 --config.mesh.fsdp=2 \
        --config.mesh.tensor=2

Process i gets JAX_COORDINATOR_ADDRESS=localhost:<free port>, JAX_NUM_PROCESSES=N,
JAX_PROCESS_ID=i (read by tttjax.parallel.distributed.initialize_distributed). With --devices_per_process,
each process sees that many fake CPU devices (XLA_FLAGS); with --one_gpu_per_process, process i
sees local GPU i (JAX_LOCAL_DEVICE_IDS). SIGTERM / SIGINT sent to the launcher are forwarded to
every process (they save at the agreed step and exit 0). If a process fails, the others are
given --grace_s seconds, then terminated; the exit code is the first failure's (0 if all pass).
Each process's pid is printed as `[launch.local] process i pid P` so a test can signal one.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launch.common import quote, split_args, train_command
from tttjax import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, num: int, port: int, devices_per_process: int,
                platform: str, one_gpu_per_process: bool) -> dict[str, str]:
    """The environment of process `index`: only the variables the launcher adds or changes."""
    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(num),
           "JAX_PROCESS_ID": str(index)}
    if devices_per_process:
        flags = [f for f in base.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        platform = platform or "cpu"
    if platform:
        env["JAX_PLATFORMS"] = platform
    if one_gpu_per_process:
        env["JAX_LOCAL_DEVICE_IDS"] = str(index)
    return env


def parse(argv):
    own, train_args = split_args(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=0,
                        help="fake CPU devices per process (sets XLA_FLAGS and JAX_PLATFORMS=cpu); 0 = leave as is")
    parser.add_argument("--platform", default="", help="JAX_PLATFORMS for the processes (cpu, cuda, ...)")
    parser.add_argument("--one_gpu_per_process", action="store_true", help="process i uses local GPU i")
    parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = a free one")
    parser.add_argument("--log_dir", default="", help="write process_<i>.log there instead of the terminal")
    parser.add_argument("--grace_s", type=float, default=60.0,
                        help="after a failure, how long the other processes get before SIGTERM (then SIGKILL)")
    parser.add_argument("--module", default="tttjax.main", help="python module each process runs")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(own)
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    return args, train_args


def _main(argv: list[str]) -> int:
    args, train_args = parse(argv)
    port = args.port or (12345 if args.dry_run else free_port())
    command = train_command(sys.executable, train_args, args.module)
    envs = [process_env(os.environ, index=i, num=args.num_processes, port=port,
                        devices_per_process=args.devices_per_process, platform=args.platform,
                        one_gpu_per_process=args.one_gpu_per_process) for i in range(args.num_processes)]
    if args.dry_run:
        for i, env in enumerate(envs):
            log = f" > {Path(args.log_dir) / f'process_{i}.log'} 2>&1" if args.log_dir else ""
            print(f"{quote([f'{k}={v}' for k, v in env.items()])} {quote(command)}{log} &")
        print("wait  # SIGTERM/SIGINT forwarded to every process; the first non-zero exit code is returned")
        return 0
    return run(command, envs, log_dir=args.log_dir, grace_s=args.grace_s)


def run(command: list[str], envs: list[dict], *, log_dir: str = "", grace_s: float = 60.0) -> int:
    logs = []
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for i, env in enumerate(envs):
        out = None
        if log_dir:
            out = open(Path(log_dir) / f"process_{i}.log", "ab")
            logs.append(out)
        procs.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
        print(f"[launch.local] process {i} pid {procs[-1].pid}", flush=True)

    def forward(signum, _frame):
        print(f"[launch.local] forwarding signal {signum} to {len(procs)} processes", flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure, failed_at = None, None
    try:
        while [p.poll() for p in procs].count(None):  # poll every process (any() would stop at the first)
            if first_failure is None:
                for i, p in enumerate(procs):
                    if p.returncode not in (None, 0):
                        first_failure, failed_at = (i, p.returncode), time.monotonic()
                        print(f"[launch.local] process {i} exited with {p.returncode}; stopping the others "
                              f"in {grace_s:.0f}s", flush=True)
                        break
            elif time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                try:
                    for p in procs:
                        p.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for f in logs:
            f.close()
    codes = [p.returncode for p in procs]
    print(f"[launch.local] exit codes {codes}", flush=True)
    if first_failure is None:
        failures = [c for c in codes if c != 0]
        return _exit_code(failures[0]) if failures else 0
    return _exit_code(first_failure[1])


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
