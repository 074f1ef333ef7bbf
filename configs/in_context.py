"""The in-context learning experiment (bench/in_context.py, docs/experiments.md): a small Moshi trained
from scratch on the per-sequence "voice" task, whose evidence lies beyond its 4-frame attention window.

bench/in_context.py writes the data and sets data.train_data / run_dir; this file holds the model
and the training recipe shared by its three variants (TTT, window only: ttt.enable=false, full
attention: model.context >= the sequence length).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/in_context"
    c.max_steps = 300
    c.batch_size = 16
    c.duration_sec = 10.24  # 128 frames
    c.log_freq = 25
    c.ckpt_freq = 0
    c.num_ckpt_keep = 1
    c.save_adapters = False  # consolidated/ holds the whole model (it is trained from scratch)
    c.export_dtype = "float32"
    c.checkpoint.async_save = False

    # attention window 4 frames, 2 layers: a window-only model sees the last 7 frames; card = the
    # task's vocabulary (bench/in_context.py --card sets it too)
    c.model.update(dim=128, num_layers=2, num_heads=4, hidden_scale=4.125, context=4, card=64,
                   text_card=16, depformer_dim=64, depformer_num_layers=1, depformer_num_heads=4,
                   depformer_dim_feedforward=264)
    c.param_dtype = "float32"
    c.dtype = "float32"
    c.remat = "none"

    c.full_finetuning = True
    c.lora.enable = False
    c.ttt.enable = True
    c.ttt.layers = "1"
    c.ttt.mini_batch_size = 8

    c.optim.lr = 3e-3
    c.optim.pct_start = 0.1
    c.first_codebook_weight_multiplier = 1.0
    return c
