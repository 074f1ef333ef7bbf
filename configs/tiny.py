"""The embedded default: a small Moshi with TTT and LoRA on the built-in synthetic data.

Trains on 2 CPU cores in a few minutes with a loss that visibly falls, and leaves checkpoints
(with their consolidated/ PyTorch export) in runs/tiny.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/tiny"
    c.max_steps = 150
    c.batch_size = 8
    c.duration_sec = 4.0  # 50 frames
    c.log_freq = 10
    c.ckpt_freq = 50
    c.num_ckpt_keep = 2

    c.model.update(dim=128, num_layers=4, num_heads=4, hidden_scale=4.125, context=3000, card=64,
                   text_card=96, depformer_dim=64, depformer_num_layers=2, depformer_num_heads=4,
                   depformer_dim_feedforward=264)
    c.param_dtype = "float32"
    c.dtype = "float32"
    c.remat = "none"

    c.lora.rank = 8
    c.ttt.enable = True
    c.ttt.layers = "1,3"
    c.ttt.mini_batch_size = 8

    c.optim.lr = 3e-3
    c.optim.pct_start = 0.1
    c.optim.ttt_lr_multiplier = 1.0
    c.first_codebook_weight_multiplier = 1.0

    c.data.train_data = "synthetic:2048"
    c.evals.standard.data = "synthetic:64"
    c.evals.standard.freq = 50
    c.evals.standard.batches = 4
    return c
