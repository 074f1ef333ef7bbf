"""Launchers for multi-process training (docs/distributed.md).

* `python -m launch.local`   N processes on this machine (tests, multi-GPU boxes without SLURM)
* `python -m launch.slurm`   an sbatch script running one process per node or per GPU with srun
* `python -m launch.tpu_pod` a Cloud TPU VM pod: create, copy the code, install, run on every
  worker, and re-create + re-run after a spot/preemptible preemption (auto-resume)

Each takes `--dry_run` (print the commands, run nothing) and passes everything after `--` to
`python -m tttjax.main`.
"""
