"""configs/moshi_7b_ttt.py on a TPU v5p-8 (4 chips, 95 GiB each): FSDP over the 4 chips.

Compiled by `python -m tttjax.compile --config=configs/moshi_7b_ttt_v5p8.py --topology=v5p-8 --no_eval`
(this CPU host, libtpu 0.0.42.1, 2026-12-08): 47.88 GiB of 95 GiB per chip at B=16 x 100 s,
predicted 75.6% MFU at the overlap bound (compute-bound), weight gathers 1.00x their minimum
(BENCHMARKS.md, "Predicted pod speed"): `remat=dots` (no recompute of the matmuls; `full`: 60.5%)
and plain weight all-gathers (`windowed_einsum=False`, as configs/moshi_7b_ttt_v5e16.py).
Predicted, not measured: time a few steps on the pod before a long run.
"""

from configs import moshi_7b_ttt


def get_config():
    c = moshi_7b_ttt.get_config()
    c.run_dir = "runs/moshi_7b_ttt_v5p8"
    c.mesh.data = 1
    c.mesh.fsdp = 4  # every chip of the slice
    c.windowed_einsum = False  # plain weight all-gathers (XLA's windowed einsums cut the matmuls per shard)
    c.remat = "dots"  # keep the matmul outputs: 47.88 of 95 GiB, predicted 75.6% MFU (remat=full: 60.5%)
    return c
