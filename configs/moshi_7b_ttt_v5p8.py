"""configs/moshi_7b_ttt.py on a TPU v5p-8 (4 chips, 95 GiB each): FSDP over the 4 chips.

Proven by `python -m tttjax.compile --config=configs/moshi_7b_ttt_v5p8.py --topology=v5p-8`: 16.50 GiB of 95 GiB per
chip at B=16 x 100 s, remat=full (docs/distributed.md, section 7; the recorded run used
configs/moshi_7b_ttt.py, whose fsdp=-1 resolves to this mesh on a v5p-8; it compiled full-score attention,
which attention_impl=auto now replaces by splash on TPU).
"""

from configs import moshi_7b_ttt


def get_config():
    c = moshi_7b_ttt.get_config()
    c.run_dir = "runs/moshi_7b_ttt_v5p8"
    c.mesh.data = 1
    c.mesh.fsdp = 4  # every chip of the slice
    return c
