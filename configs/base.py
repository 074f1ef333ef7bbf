"""Every training key, with the names users know from moshi-finetune and the TTT-Moshi guide.

Other configs start from `get_config()` here and change what they need; `--config.a.b=v`
overrides any key on the command line, and unknown keys fail.
"""

import ml_collections

from tttjax.model.config import MOSHI_7B_LM_KWARGS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/exp"  # where args.yaml, checkpoints/ and logs/ go
    c.seed = 0  # model init and data order
    c.max_steps = 100  # optimizer steps
    c.batch_size = 16  # global batch (sequences per step, all processes together)
    c.num_microbatches = 1  # gradient accumulation: the batch is split in this many parts
    c.duration_sec = 100.0  # sequence length in seconds (12.5 frames per second)
    c.log_freq = 1  # log every this many steps

    c.do_ckpt = True  # write checkpoints at all
    c.ckpt_freq = 0  # checkpoint every this many steps; 0 = only at the end
    c.num_ckpt_keep = ml_collections.FieldReference(3, field_type=int)  # keep the last N; None = keep all
    c.save_adapters = True  # consolidated/ holds lora.safetensors (LoRA + TTT) instead of the merged model
    c.export_dtype = "bfloat16"  # dtype of the consolidated/ safetensors

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.resume = "auto"  # auto: resume from run_dir's latest checkpoint if any; never: refuse if any
    c.checkpoint.resume_step = -1  # which step to resume from; -1 = latest
    c.checkpoint.init_state_dir = ""  # weights only (fresh optimizer, step 0): a step dir or an imported dir
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.checkpoint.allow_data_change = False  # resume although batch_size/duration_sec/data/seed changed (logged)

    c.model = ml_collections.ConfigDict(dict(MOSHI_7B_LM_KWARGS))  # moshi LM config (lm_kwargs)
    c.model.attention_impl = "auto"  # temporal attention: auto | xla (full scores) | blockwise | splash (TPU) | cudnn (GPU)
    c.param_dtype = "bfloat16"  # stored parameter dtype (trainable params keep fp32 masters)
    c.dtype = "bfloat16"  # compute dtype; norms, RoPE, softmax and the TTT inner loop stay fp32
    c.remat = "full"  # remat of temporal, TTT and depformer layers: none | full (keep inputs) | dots (matmul outputs)
    c.unroll_layers = False  # unroll the layer stacks (no per-layer stacking of residuals/grads; longer compiles)

    c.moshi_paths = ml_collections.ConfigDict()
    c.moshi_paths.moshi_path = ""  # base weights: PyTorch .safetensors or a tttjax checkpoint dir; "" = random
    c.moshi_paths.config_path = ""  # moshi config.json for a .safetensors base; overrides `model`

    c.lora = ml_collections.ConfigDict()
    c.lora.enable = True  # LoRA on every Linear
    c.lora.rank = 128  # LoRA rank
    c.lora.scaling = 2.0  # plain multiplier of B(Ax) (moshi semantics, not alpha/rank)

    c.full_finetuning = False  # train every parameter (else LoRA + TTT + gates)
    c.frozen_weights = "sharded"  # frozen base: sharded (FSDP, gathered at each use) | gather_once (per step, held) | replicated

    c.ttt = ml_collections.ConfigDict()
    c.ttt.enable = False  # insert TTT-MLP layers
    c.ttt.layers = "1,5,10"  # 0-based temporal layers: "1,5,10" | "all" | "middle" | "none"
    c.ttt.base_lr = 1.0  # inner-loop step size base
    c.ttt.mini_batch_size = 16  # K: frames per inner mini-batch
    c.ttt.initial_gating_alpha = 0.1  # gate init; tanh(alpha) scales the TTT branch
    c.ttt.causal = True  # causal step-size matrix; False = bidirectional compatibility mode
    c.ttt.scan_remat_group = 1  # checkpoint the inner scan every this many mini-batches
    c.ttt.num_heads = 0  # TTT heads; 0 = the temporal heads

    c.first_codebook_weight_multiplier = 100.0  # loss weight of the semantic codebook
    c.text_padding_weight = 0.5  # loss weight of text pad tokens (3 and 0)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-6  # peak learning rate of the OneCycle schedule
    c.optim.weight_decay = 0.1  # AdamW decoupled weight decay
    c.optim.pct_start = 0.05  # warm-up fraction of max_steps
    c.optim.b1 = 0.9  # Adam beta1 when cycle_momentum is off
    c.optim.b2 = 0.95  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.max_norm = 1.0  # global gradient-norm clip
    c.optim.cycle_momentum = True  # beta1 0.95 -> 0.85 -> 0.95 with the LR, as torch OneCycleLR
    c.optim.ttt_lr_multiplier = 1.0  # LR multiplier of TTT weights
    c.optim.gate_lr_multiplier = 1.0  # LR multiplier of the TTT gates

    c.data = ml_collections.ConfigDict()
    c.data.train_data = ""  # prepared dir(s), "synthetic[:N]", "tfds:name", or "a:0.7,b:0.3"
    c.data.eval_data = ""  # same forms; "" = no evaluation
    c.data.shuffle = True  # global shuffle, reshuffled every epoch
    c.data.num_workers = 0  # grain worker processes

    c.eval_freq = 0  # evaluate every this many steps; 0 = never
    c.eval_batches = 40  # batches per evaluation (0 = the whole eval set)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis; -1 = the remaining devices (per slice when a dcn_* is not 1)
    c.mesh.fsdp = 1  # fully-sharded axis: params, optimizer state and batch split over it
    c.mesh.tensor = 1  # tensor-parallel axis: heads, MLP hidden, vocab
    c.mesh.dcn_data = 1  # data axis across TPU slices (GPU/CPU: processes) over DCN; -1 = the remaining slices
    c.mesh.dcn_fsdp = 1  # fsdp axis across slices/processes (mesh axis size = fsdp * dcn_fsdp)
    c.mesh.dcn_tensor = 1  # tensor axis across slices/processes (rarely useful)
    c.memory_check = "error"  # start-up per-device memory estimate vs device memory: error | warn | off
    c.compiled_step = ""  # a step tttjax.compile --save_executable wrote: loaded, not compiled; refused unless it is this run's

    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""  # "" = wandb off
    c.wandb.offline = True  # no network: write the run locally
    c.wandb.run_name = ""  # defaults to the run_dir name
    return c
