"""configs/moshi_7b_ttt.py on a TPU v5e-16 (16 chips, 16 GiB each): FSDP over the 16 chips, one
sequence of 100 s per chip.

Proven by `python -m tttjax.compile --config=configs/moshi_7b_ttt_v5e16.py --topology=v5e-16`: 5.28 GiB of 16 GiB per
chip at B=16 x 100 s, remat=full (docs/distributed.md, section 7; the recorded run used
configs/moshi_7b_ttt.py, whose fsdp=-1 resolves to this mesh on a v5e-16; it compiled full-score attention,
which attention_impl=auto now replaces by splash on TPU).

Weight gathers as plain all-gathers (`windowed_einsum=False`): with XLA's windowed einsums the step
is predicted ICI-bound at 37% MFU, without them at 60% (BENCHMARKS.md, "Predicted pod speed").
"""

from configs import moshi_7b_ttt


def get_config():
    c = moshi_7b_ttt.get_config()
    c.run_dir = "runs/moshi_7b_ttt_v5e16"
    c.mesh.data = 1
    c.mesh.fsdp = 16  # every chip of the slice
    c.windowed_einsum = False  # plain weight all-gathers: predicted 60% MFU against 37% with XLA's windowed einsums
    return c
