"""Long-context TTT-Moshi 7B: 30-minute conversations (22,500 frames, 7.5x the 3000-frame attention
window), one sequence per chip, so the TTT layers carry memory far past what attention sees.

Attention is `auto`: splash (Pallas, sliding window) on TPU, cuDNN on GPU, so its memory is linear
in T. Sized for a TPU v5p-8 (4 chips, FSDP over all of them); check another slice with
`python -m tttjax.compile --config=configs/moshi_7b_ttt_long.py --topology=...` (docs/training.md,
BENCHMARKS.md for the recorded fits). The data must be prepared whole (`tttjax.data.prepare
--duration_sec 0`) or in segments at least this long.
"""

from configs import moshi_7b_ttt


def get_config():
    c = moshi_7b_ttt.get_config()
    c.run_dir = "runs/moshi_7b_ttt_long"
    c.duration_sec = 1800.0  # 30 min = 22,500 frames per sequence
    c.batch_size = 4  # one sequence per chip of a v5p-8
    c.max_steps = 1000  # 1000 x 4 x 30 min = 2000 h of conversation
    c.ckpt_freq = 50  # a step is ~8x a 100 s step: checkpoint more often in wall-clock terms
    c.evals.standard.freq = 50  # evaluate as often as checkpoints are written
    c.evals.standard.batches = 8  # 32 conversations of 30 min
    c.model.attention_impl = "auto"  # splash on TPU, cudnn on GPU: no T x T scores
    c.ttt.layers = "1,5,10"  # TTT-MLP layers, as the 100 s recipe
    c.ttt.scan_remat_group = 8  # 1407 inner mini-batches: keep every 8th inner state for the backward
    c.mesh.fsdp = -1  # FSDP over every chip
    return c
