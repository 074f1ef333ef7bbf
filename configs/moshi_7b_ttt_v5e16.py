"""configs/moshi_7b_ttt.py on a TPU v5e-16 (16 chips, 16 GiB each): FSDP over the 16 chips, one
sequence of 100 s per chip.

Compiled by `python -m tttjax.compile --config=configs/moshi_7b_ttt_v5e16.py --topology=v5e-16 --no_eval`
(this CPU host, libtpu 0.0.42.1, 2026-12-08): 12.11 GiB of 16 GiB per chip at B=16 x 100 s,
predicted 66.8% MFU at the overlap bound, weight gathers 1.00x their minimum (BENCHMARKS.md,
"Predicted pod speed"). Two choices make it so, against configs/moshi_7b_ttt.py's defaults:
weight gathers as plain all-gathers (`windowed_einsum=False`; XLA's windowed einsums cut every
matmul into per-shard pieces: 37% MFU predicted) and `remat=dots` (each weight matmul's output
kept: no recompute of the matmuls, and each weight gathered once per pass; `full`: 60.3%, 4.46 GiB).
Predicted, not measured: time a few steps on the pod before a long run.
"""

from configs import moshi_7b_ttt


def get_config():
    c = moshi_7b_ttt.get_config()
    c.run_dir = "runs/moshi_7b_ttt_v5e16"
    c.mesh.data = 1
    c.mesh.fsdp = 16  # every chip of the slice
    c.windowed_einsum = False  # plain weight all-gathers: predicted 60% MFU against 37% with XLA's windowed einsums
    c.remat = "dots"  # keep the matmul outputs: 12.11 of 16 GiB, predicted 66.8% MFU (remat=full: 4.46 GiB, 60.3%)
    return c
