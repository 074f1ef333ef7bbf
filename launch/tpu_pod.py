"""Train on a Cloud TPU VM pod slice (or several slices) with gcloud; survive spot preemptions.

    python -m launch.tpu_pod --name=ttt --zone=us-east5-a --project=P --accelerator_type=v5p-64 \
        --spot --max_restarts=20 -- --config=configs/moshi_7b_ttt.py --config.run_dir=/mnt/runs/7b

What it runs (every command is printed; --dry_run prints them and runs nothing):
 1. `tpu-vm describe`: create the TPU if it does not exist (`tpu-vm create`, or for
    --num_slices > 1 a `queued-resources create` with one node per slice), delete and re-create
    it if it was preempted;
 2. copy this working tree (git-tracked and untracked-but-not-ignored files) to every worker
    (`tpu-vm scp --worker=all`) and install it into ~/venv with `jax[tpu]` (`tpu-vm ssh --worker=all`);
 3. run `python -m tttjax.main <args after -->` on every worker at once (`tpu-vm ssh --worker=all`).
    JAX finds the other workers itself (TPU metadata); for several slices the MEGASCALE_* variables
    name slice 0's first worker as coordinator and each slice's id;
 4. if that fails because the TPU went away (spot/preemptible), go back to 1. The same command
    resumes: tttjax restores the run's latest checkpoint, so run_dir must be storage every worker
    shares and that outlives the VMs (a gcsfuse-mounted bucket or Filestore), not a worker's disk.
A SIGTERM from a maintenance event or preemption notice makes the workers save at the agreed step.
A failure while the TPU is still READY is a real error: it is returned, not retried (unless
--retry_errors).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from launch.common import quote, split_args, train_command
from tttjax import cli
from tttjax.errors import UserError

RUNTIME_VERSIONS = {  # accelerator family -> TPU VM software version
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GONE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "FAILED", "")
MEGASCALE_PORT = 8080
REMOTE_ARCHIVE = "tttjax-code.tgz"


def parse(argv):
    own, train_args = split_args(argv)
    p = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name (queued resource / node prefix with --num_slices>1)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="GCP project; default: gcloud's configured one")
    p.add_argument("--accelerator_type", default="v5p-64", help="e.g. v5p-64, v5litepod-256, v4-32")
    p.add_argument("--runtime_version", default="", help="TPU VM software version; default by accelerator family")
    p.add_argument("--num_slices", type=int, default=1, help=">1: multi-slice over DCN (set mesh.dcn_data=-1)")
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible at any time)")
    p.add_argument("--preemptible", action="store_true", help="legacy preemptible VMs (v4 and older)")
    p.add_argument("--create", choices=("auto", "never"), default="auto",
                   help="auto: create the TPU when missing or preempted; never: it must exist")
    p.add_argument("--max_restarts", type=int, default=0, help="re-create and re-run this many times after preemption")
    p.add_argument("--retry_errors", action="store_true", help="also retry failures while the TPU is READY")
    p.add_argument("--remote_dir", default="tttjax", help="code directory in each worker's home")
    p.add_argument("--jax_version", default="", help="jax[tpu] version to install; default: the local jax's")
    p.add_argument("--setup", default="", help="extra shell run on every worker after install (e.g. gcsfuse mount)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported for training (repeatable)")
    p.add_argument("--skip_setup", action="store_true", help="do not copy/install (the workers are ready)")
    p.add_argument("--delete_after", action="store_true", help="delete the TPU once training succeeded")
    p.add_argument("--poll_s", type=float, default=60.0, help="wait between state checks of a queued resource")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(own)
    if args.num_slices < 1:
        p.error("--num_slices must be >= 1")
    for item in args.env:
        if "=" not in item:
            p.error(f"--env {item!r}: expected KEY=VALUE")
    return args, train_args


def runtime_version(args) -> str:
    if args.runtime_version:
        return args.runtime_version
    family = re.match(r"(v\d+[a-z]*)", args.accelerator_type)
    family = family.group(1) if family else ""
    if family not in RUNTIME_VERSIONS:
        raise UserError(f"no default runtime version for {args.accelerator_type}; pass --runtime_version")
    return RUNTIME_VERSIONS[family]


class Pod:
    """The gcloud command lines for one launch; `run` executes (or, dry, prints) them."""

    def __init__(self, args, train_args, *, dry_run: bool):
        self.args, self.dry_run = args, dry_run
        self.train_args = train_args
        self.loc = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
        self.nodes = [args.name] if args.num_slices == 1 else [f"{args.name}-{i}" for i in range(args.num_slices)]

    # -- commands ------------------------------------------------------------------------------
    def tpu(self, *words) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", *words]

    def describe(self) -> list[str]:
        if self.args.num_slices > 1:
            return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.args.name, *self.loc,
                    "--format=value(state.state)"]
        return self.tpu("describe", self.args.name, *self.loc, "--format=value(state)")

    def create(self) -> list[str]:
        a = self.args
        capacity = ["--spot"] if a.spot else (["--preemptible"] if a.preemptible else [])
        if a.num_slices > 1:
            return ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *self.loc,
                    f"--accelerator-type={a.accelerator_type}", f"--runtime-version={runtime_version(a)}",
                    f"--node-count={a.num_slices}", f"--node-prefix={a.name}", *capacity]
        return self.tpu("create", a.name, *self.loc, f"--accelerator-type={a.accelerator_type}",
                        f"--version={runtime_version(a)}", *capacity)

    def delete(self) -> list[str]:
        if self.args.num_slices > 1:
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.args.name, *self.loc,
                    "--force", "--quiet"]
        return self.tpu("delete", self.args.name, *self.loc, "--quiet")

    def ssh(self, node: str, command: str) -> list[str]:
        return self.tpu("ssh", node, *self.loc, "--worker=all", f"--command={command}")

    def scp(self, node: str, archive: str) -> list[str]:
        return self.tpu("scp", archive, f"{node}:~/{REMOTE_ARCHIVE}", *self.loc, "--worker=all")

    def coordinator_ip(self) -> list[str]:
        return self.tpu("describe", self.nodes[0], *self.loc, "--format=value(networkEndpoints[0].ipAddress)")

    def install_command(self) -> str:
        import jax

        a = self.args
        version = a.jax_version or jax.__version__
        steps = [f"mkdir -p ~/{a.remote_dir}", f"tar xzf ~/{REMOTE_ARCHIVE} -C ~/{a.remote_dir}",
                 f"cd ~/{a.remote_dir}", "(test -d ~/venv || python3 -m venv ~/venv)",
                 "~/venv/bin/pip install -q -U pip",
                 f"~/venv/bin/pip install -q 'jax[tpu]=={version}' -r requirements.txt"]
        if a.setup:
            steps.append(a.setup)
        return " && ".join(steps)

    def train_command(self, slice_id: int, coordinator: str) -> str:
        env = list(self.args.env)
        if self.args.num_slices > 1:
            env += [f"MEGASCALE_COORDINATOR_ADDRESS={coordinator}:{MEGASCALE_PORT}",
                    f"MEGASCALE_NUM_SLICES={self.args.num_slices}", f"MEGASCALE_SLICE_ID={slice_id}",
                    f"MEGASCALE_PORT={MEGASCALE_PORT}"]
        command = train_command("~/venv/bin/python", self.train_args)
        exports = f"export {quote(env)} && " if env else ""
        # `python` is ~/venv's; quote everything but the home-relative interpreter path
        return f"cd ~/{self.args.remote_dir} && {exports}{command[0]} {quote(command[1:])}"

    # -- execution -----------------------------------------------------------------------------
    def call(self, command: list[str], *, capture: bool = False, check: bool = True):
        print(f"$ {quote(command)}", flush=True)
        if self.dry_run:
            return 0, ""
        done = subprocess.run(command, text=True, capture_output=capture)
        if check and done.returncode:
            raise UserError(f"command failed ({done.returncode}): {quote(command)}\n{done.stderr or ''}")
        return done.returncode, (done.stdout or "").strip()

    def state(self) -> str:
        rc, out = self.call(self.describe(), capture=True, check=False)
        return out if rc == 0 else "" if not self.dry_run else "READY"

    def ensure(self) -> bool:
        """The TPU exists and is usable; (re-)created when missing or preempted. Returns whether it was."""
        state = self.state()
        if not self.dry_run and state in ("READY", "ACTIVE"):
            return False
        if self.args.create == "never":
            raise UserError(f"TPU {self.args.name} is {state or 'missing'} and --create=never")
        if state:
            self.call(self.delete(), check=False)
        self.call(self.create())
        while self.args.num_slices > 1 and not self.dry_run and self.state() != "ACTIVE":
            time.sleep(self.args.poll_s)
        return True

    def setup(self) -> None:
        archive = os.path.join(tempfile.gettempdir(), REMOTE_ARCHIVE)
        files = code_files()
        print(f"# pack {len(files)} files of {Path.cwd()} into {archive}", flush=True)
        if not self.dry_run:
            with tarfile.open(archive, "w:gz") as tar:
                for f in files:
                    tar.add(f)
        for node in self.nodes:
            self.call(self.scp(node, archive))
            self.call(self.ssh(node, self.install_command()))

    def train(self) -> int:
        coordinator = ""
        if self.args.num_slices > 1:
            _, coordinator = self.call(self.coordinator_ip(), capture=True)
            coordinator = coordinator or f"<ip of {self.nodes[0]} worker 0>"
        commands = [self.ssh(node, self.train_command(i, coordinator)) for i, node in enumerate(self.nodes)]
        for command in commands:
            print(f"$ {quote(command)}{' &' if len(commands) > 1 else ''}", flush=True)
        if self.dry_run:
            return 0
        procs = [subprocess.Popen(c) for c in commands]
        codes = [p.wait() for p in procs]
        return next((c for c in codes if c), 0)


def code_files() -> list[str]:
    """The files to ship: git-tracked plus untracked-but-not-ignored (what `git status` shows)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True,
                             check=True).stdout
        return [f for f in out.splitlines() if f and os.path.isfile(f)]
    except (OSError, subprocess.CalledProcessError):
        raise UserError("run from the repository root (a git checkout): the code to copy is found with git")


def _main(argv: list[str]) -> int:
    args, train_args = parse(argv)
    train_command("python", train_args)  # fails early without --config
    pod = Pod(args, train_args, dry_run=args.dry_run)
    attempt, first = 0, True
    while True:
        created = pod.ensure()
        if created or (first and not args.skip_setup):
            pod.setup()
        first = False
        rc = pod.train()
        if args.dry_run:
            print(f"# if training fails: describe the TPU; when it is gone (preempted) delete it, re-create it, copy "
                  f"and install again and re-run the same command (it resumes), up to {args.max_restarts} restarts:")
            print(f"$ {quote(pod.delete())}")
            if args.delete_after:
                print(f"# after success:\n$ {quote(pod.delete())}")
            return 0
        if rc == 0:
            print(f"[launch.tpu_pod] training finished (attempt {attempt})", flush=True)
            if args.delete_after:
                pod.call(pod.delete(), check=False)
            return 0
        state = pod.state()
        gone = state in GONE_STATES or (args.num_slices > 1 and state != "ACTIVE")
        if attempt >= args.max_restarts or not (gone or args.retry_errors):
            print(f"[launch.tpu_pod] training failed with {rc}; TPU state {state or 'missing'}; giving up", flush=True)
            return rc
        attempt += 1
        print(f"[launch.tpu_pod] training failed with {rc}; TPU state {state or 'missing'}; restart "
              f"{attempt}/{args.max_restarts} (resumes from the latest checkpoint)", flush=True)


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
