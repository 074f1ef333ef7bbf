"""Moshi 7B fine-tuning with TTT: LoRA rank 128 on every Linear, TTT-MLP at temporal layers 1, 5, 10.

bf16 parameters (fp32 masters and optimizer state for what trains), per-layer remat, FSDP over
all devices. Set moshi_paths.moshi_path to the base weights (a moshi `model.safetensors` with
moshi_paths.config_path, or a `conversion.from_pytorch` output dir) and data.train_data.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/moshi_7b_ttt"
    c.max_steps = 2000
    c.batch_size = 16
    c.duration_sec = 100.0
    c.ckpt_freq = 100
    c.num_ckpt_keep = 3
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.remat = "full"
    c.lora.enable = True
    c.lora.rank = 128
    c.lora.scaling = 2.0
    c.ttt.enable = True
    c.ttt.layers = "1,5,10"
    c.ttt.mini_batch_size = 16
    c.ttt.scan_remat_group = 4
    c.optim.lr = 2e-6
    c.optim.ttt_lr_multiplier = 10.0
    c.optim.gate_lr_multiplier = 10.0
    c.first_codebook_weight_multiplier = 100.0
    c.text_padding_weight = 0.5
    c.evals.standard.freq = 100
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
