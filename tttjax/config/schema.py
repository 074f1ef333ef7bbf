"""Every training key: its default, its one-line comment and its check, in one place.

`default_config()` is the ConfigDict every run starts from (configs/base.py returns it; the other
configs change what they need); `validate(config)` checks each key's value and the rules that
span keys, naming the key; `describe(config)` is `--help`. The names are those users know from
moshi-finetune and the PyTorch TTT-Moshi guide. The model block is moshi's LM config
(`lm_kwargs`); the TTT and LoRA defaults come from tttjax/model/config.py, which the model and
config.json also read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from tttjax.errors import ConfigError
from tttjax.model.config import (
    ATTENTION_IMPLS,
    DEFAULT_ATTENTION_IMPL,
    LORA_SCALING,
    MOSHI_7B_LM_KWARGS,
    REMAT_MODES,
    TTT_DEFAULTS,
    parse_ttt_layers,
)

Check = Callable[[Any], str | None]  # the problem with a value, or None


@dataclasses.dataclass(frozen=True)
class Key:
    default: Any
    comment: str
    check: Check | None = None
    nullable: bool = False  # None is a valid value (the field keeps the default's type otherwise)


@dataclasses.dataclass(frozen=True)
class Section:
    comment: str
    keys: dict[str, Key | Section]


# -- checks -----------------------------------------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low, *, strict: bool = False) -> Check:
    def check(value):
        if not _number(value):
            return "must be a finite number"
        if value < low or (strict and value == low):
            return f"must be {'>' if strict else '>='} {low}"
        return None
    return check


def between(low, high, *, high_open: bool = False) -> Check:
    def check(value):
        if not _number(value) or not low <= value <= high or (high_open and value == high):
            return f"must be in [{low}, {high}{')' if high_open else ']'}"
        return None
    return check


def finite(value) -> str | None:
    return None if _number(value) else "must be a finite number"


def one_of(*choices) -> Check:
    def check(value):
        return None if value in choices else f"expected one of {', '.join(map(str, choices))}"
    return check


def mesh_axis(value) -> str | None:
    return None if isinstance(value, int) and (value == -1 or value >= 1) else "must be -1 (the rest) or >= 1"


positive = at_least(0, strict=True)
non_negative = at_least(0)
DTYPES = ("float32", "bfloat16", "float16")
# Where the frozen base weights live: "sharded" like every weight (FSDP: gathered at every use, forward
# and backward of every microbatch), "gather_once" (stored sharded, gathered once at the start of each
# step and held through all its passes, as MaxText's model_fsdp_ag_once), "replicated" (a full copy
# per device, split over tensor only: never gathered). parallel/sharding.py places them.
FROZEN_PLACEMENTS = ("sharded", "gather_once", "replicated")


SCHEMA = Section("a tttjax training run", dict(
    run_dir=Key("runs/exp", "where args.yaml, checkpoints/ and logs/ go"),
    seed=Key(0, "model init and data order", non_negative),
    max_steps=Key(100, "optimizer steps", at_least(1)),
    batch_size=Key(16, "global batch (sequences per step, all processes together)", at_least(1)),
    num_microbatches=Key(1, "gradient accumulation: the batch is split in this many parts", at_least(1)),
    duration_sec=Key(100.0, "sequence length in seconds (12.5 frames per second)", positive),
    log_freq=Key(1, "log every this many steps", at_least(1)),
    do_ckpt=Key(True, "write checkpoints at all"),
    ckpt_freq=Key(0, "checkpoint every this many steps; 0 = only at the end", non_negative),
    num_ckpt_keep=Key(3, "keep the last N; None = keep all", at_least(1), nullable=True),
    save_adapters=Key(True, "consolidated/ holds lora.safetensors (LoRA + TTT) instead of the merged model"),
    export_dtype=Key("bfloat16", "dtype of the consolidated/ safetensors", one_of(*DTYPES)),
    checkpoint=Section("resume and checkpoint writing", dict(
        resume=Key("auto", "auto: resume from run_dir's latest checkpoint if any; never: refuse if any",
                 one_of("auto", "never")),
        resume_step=Key(-1, "which step to resume from; -1 = latest", at_least(-1)),
        init_state_dir=Key("", "weights only (fresh optimizer, step 0): a step dir or an imported dir"),
        async_save=Key(True, "write checkpoints in the background"),
        allow_data_change=Key(False, "resume although batch_size/duration_sec/data/seed changed (logged)"),
        local_dir=Key("", "a directory on each host's own disk (same path on every host) for frequent local "
                      "copies of the state; \"\" = none"),
        local_ckpt_freq=Key(0, "a local copy every this many steps (checkpoint.local_dir); 0 = none", non_negative),
        local_keep=Key(2, "local copies kept per process (the newest)", at_least(1)),
        read_attempts=Key(4, "tries of a checkpoint read that fails with an I/O error before the run stops",
                          at_least(1)),
        retry_wait_s=Key(2.0, "seconds before the first retry of a failed read (then doubling)", non_negative),
        if_all_broken=Key("refuse", "when every checkpoint is damaged: refuse (naming them) | start_over (set them "
                          "aside, train from the starting weights)", one_of("refuse", "start_over")),
        stop_timeout_s=Key(60.0, "after Ctrl-C or a preemption notice, the longest the run may take to reach a "
                           "step boundary and save; then it exits without a new save", positive),
    )),
    distributed=Section("the multi-process runtime (jax.distributed)", dict(
        initialization_timeout_s=Key(300, "how long start-up waits for every process to connect", at_least(1)),
        heartbeat_timeout_s=Key(60, "a process silent this long is lost: every other one exits (code 75)",
                                at_least(1)),
        shutdown_timeout_s=Key(300, "how long a finished process waits for the others at exit", at_least(1)),
    )),
    model=Section("moshi LM config (lm_kwargs) and how the temporal attention runs", dict(
        attention_impl=Key(DEFAULT_ATTENTION_IMPL, "temporal attention: auto | xla (full scores) | blockwise | "
                           "splash (TPU) | cudnn (GPU)", one_of(*ATTENTION_IMPLS)),
        **{name: Key(value, "moshi LM option (lm_kwargs)", nullable=value is None)
           for name, value in MOSHI_7B_LM_KWARGS.items()},
    )),
    param_dtype=Key("bfloat16", "stored parameter dtype (trainable params keep fp32 masters)", one_of(*DTYPES)),
    dtype=Key("bfloat16", "compute dtype; norms, RoPE, softmax and the TTT inner loop stay fp32", one_of(*DTYPES)),
    remat=Key("full", "remat of temporal, TTT and depformer layers: none | full (keep inputs) | dots (matmul "
            "outputs) | save_qkv (inputs and q/k/v projections)", one_of(*REMAT_MODES)),
    unroll_layers=Key(False, "unroll the layer stacks (no per-layer stacking of residuals/grads; longer compiles)"),
    moshi_paths=Section("base weights", dict(
        moshi_path=Key("", "base weights: PyTorch .safetensors or a tttjax checkpoint dir; \"\" = random"),
        config_path=Key("", "moshi config.json for a .safetensors base; overrides `model`"),
    )),
    lora=Section("LoRA on every Linear", dict(
        enable=Key(True, "LoRA on every Linear"),
        rank=Key(128, "LoRA rank", at_least(1)),
        scaling=Key(LORA_SCALING, "plain multiplier of B(Ax) (moshi semantics, not alpha/rank)", finite),
    )),
    full_finetuning=Key(False, "train every parameter (else LoRA + TTT + gates)"),
    frozen_weights=Key("sharded", "frozen base: sharded (FSDP, gathered at each use) | gather_once (per step, held) | "
                       "replicated", one_of(*FROZEN_PLACEMENTS)),
    windowed_einsum=Key(True, "XLA:TPU compiles FSDP weight gathers and reduce-scatters into the matmuls as windowed "
                        "einsums (collective-permute rings); false: plain all-gathers / reduce-scatters (train step, "
                        "TPU only; docs/distributed.md)"),
    ttt=Section("TTT-MLP layers", dict(
        enable=Key(False, "insert TTT-MLP layers"),
        layers=Key("1,5,10", "0-based temporal layers: \"1,5,10\" | \"all\" | \"middle\" | \"none\""),
        base_lr=Key(TTT_DEFAULTS["base_lr"], "inner-loop step size base", non_negative),
        mini_batch_size=Key(TTT_DEFAULTS["mini_batch_size"], "K: frames per inner mini-batch", at_least(1)),
        initial_gating_alpha=Key(TTT_DEFAULTS["initial_gating_alpha"], "gate init; tanh(alpha) scales the TTT "
                               "branch", finite),
        causal=Key(TTT_DEFAULTS["causal"], "causal step-size matrix; False = bidirectional compatibility mode"),
        scan_remat_group=Key(TTT_DEFAULTS["scan_remat_group"], "checkpoint the inner scan every this many "
                           "mini-batches", at_least(1)),
        num_heads=Key(TTT_DEFAULTS["num_heads"], "TTT heads; 0 = the temporal heads", non_negative),
    )),
    first_codebook_weight_multiplier=Key(100.0, "loss weight of the semantic codebook", non_negative),
    text_padding_weight=Key(0.5, "loss weight of text pad tokens (3 and 0)", non_negative),
    optim=Section("AdamW with moshi-finetune's OneCycle schedule", dict(
        lr=Key(2e-6, "peak learning rate of the OneCycle schedule", positive),
        weight_decay=Key(0.1, "AdamW decoupled weight decay", non_negative),
        pct_start=Key(0.05, "warm-up fraction of max_steps", between(0, 1)),
        b1=Key(0.9, "Adam beta1 when cycle_momentum is off", between(0, 1, high_open=True)),
        b2=Key(0.95, "Adam beta2", between(0, 1, high_open=True)),
        eps=Key(1e-8, "Adam epsilon", positive),
        max_norm=Key(1.0, "global gradient-norm clip", positive),
        cycle_momentum=Key(True, "beta1 0.95 -> 0.85 -> 0.95 with the LR, as torch OneCycleLR"),
        ttt_lr_multiplier=Key(10.0, "LR multiplier of TTT weights (TTT-Moshi's weight_lr_multiplier)", non_negative),
        gate_lr_multiplier=Key(100.0, "LR multiplier of the TTT gates (TTT-Moshi's alpha_lr_multiplier)",
                               non_negative),
    )),
    data=Section("training and evaluation data", dict(
        train_data=Key("", "prepared dir(s), \"synthetic[:N]\", \"tfds:name\", or \"a:0.7,b:0.3\""),
        shuffle=Key(True, "global shuffle, reshuffled every epoch"),
        num_workers=Key(0, "grain worker processes", non_negative),
    )),
    evals=Section("evaluations: the trainer runs each every `freq` steps (0 = never); python -m tttjax.eval "
            "--evals runs them on a checkpoint", dict(
        standard=Section("token-weighted CE / perplexity per stream and codebook", dict(
            freq=Key(0, "every this many steps; 0 = never (moshi-finetune's eval_freq)", non_negative),
            data=Key("", "dataset spec, as data.train_data; \"\" = none (moshi-finetune's data.eval_data)"),
            batches=Key(40, "batches per evaluation; 0 = the whole eval set (eval_batches)", non_negative),
        )),
        long_context=Section("CE at each frame index through the chunked streaming forward (TTT state carried)", dict(
            freq=Key(0, "every this many steps; 0 = never", non_negative),
            data=Key("", "codes .npy files [B, 17, T], comma-separated"),
            chunk_size=Key(64, "frames per call with the state carried; 0 = one full-sequence forward",
                         non_negative),
        )),
        paper_metrics=Section("sWUGGY / sBLIMP / sStoryCloze / tStoryCloze pairwise accuracies", dict(
            freq=Key(0, "every this many steps; 0 = never", non_negative),
            data=Key("", "task=PATH[,task=PATH...] or a manifest .jsonl (as tttjax.eval --paper_data)"),
            mimi_weight=Key("", "local Mimi safetensors that encodes the wavs"),
            max_pairs=Key(0, "the first N pairs of each task; 0 = all", non_negative),
            batch_size=Key(8, "sequences per forward pass", at_least(1)),
        )),
    )),
    mesh=Section("the (data, fsdp, tensor) device mesh", dict(
        data=Key(-1, "data-parallel axis; -1 = the remaining devices (per slice when a dcn_* is not 1)", mesh_axis),
        fsdp=Key(1, "fully-sharded axis: params, optimizer state and batch split over it", mesh_axis),
        tensor=Key(1, "tensor-parallel axis: heads, MLP hidden, vocab", mesh_axis),
        dcn_data=Key(1, "data axis across TPU slices (GPU/CPU: processes) over DCN; -1 = the remaining slices",
                   mesh_axis),
        dcn_fsdp=Key(1, "fsdp axis across slices/processes (mesh axis size = fsdp * dcn_fsdp)", mesh_axis),
        dcn_tensor=Key(1, "tensor axis across slices/processes (rarely useful)", mesh_axis),
    )),
    memory_check=Key("error", "start-up per-device memory estimate vs device memory: error | warn | off",
                   one_of("error", "warn", "off")),
    compiled_step=Key("", "a step tttjax.compile --save_executable wrote: loaded, not compiled; refused unless it "
                      "is this run's"),
    wandb=Section("wandb logging", dict(
        project=Key("", "\"\" = wandb off"),
        offline=Key(True, "no network: write the run locally"),
        run_name=Key("", "defaults to the run_dir name"),
    )),
))


# Other spellings of a key that configs may use (moshi-finetune's names): read as the key they name.
ALIASES = {"eval_freq": "evals.standard.freq", "eval_batches": "evals.standard.batches",
           "data.eval_data": "evals.standard.data"}


def _build(section: Section) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict()
    for name, entry in section.keys.items():
        if isinstance(entry, Section):
            out[name] = _build(entry)
        elif entry.nullable and entry.default is not None:
            out[name] = ml_collections.FieldReference(entry.default, field_type=type(entry.default))
        else:
            out[name] = entry.default
    return out


def default_config() -> ml_collections.ConfigDict:
    """A fresh ConfigDict of every key at its default."""
    return _build(SCHEMA)


def entries(section: Section = SCHEMA, prefix: str = ""):
    """(dotted key, Key | Section) of every entry, depth first."""
    for name, entry in section.keys.items():
        yield f"{prefix}{name}", entry
        if isinstance(entry, Section):
            yield from entries(entry, f"{prefix}{name}.")


def lookup(key: str) -> Key | Section | None:
    """The schema entry of dotted `key`, or None."""
    node: Key | Section = SCHEMA
    for part in key.split("."):
        if not isinstance(node, Section) or part not in node.keys:
            return None
        node = node.keys[part]
    return node


def key_paths() -> list[str]:
    return [key for key, entry in entries() if isinstance(entry, Key)]


# -- validation -------------------------------------------------------------------------------------
def _value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def check_keys(config, *, source: str = "") -> None:
    """Each key's own check; ConfigError naming `source` (where the config came from) and the key."""
    for key, entry in entries():
        if isinstance(entry, Key) and entry.check is not None:
            value = _value(config, key)
            if value is None and entry.nullable:
                continue
            problem = entry.check(value)
            if problem:
                raise ConfigError(f"{source}{key}={value!r}: {problem}")


def check_rules(config, *, source: str = "") -> None:
    """The rules that span keys."""
    if bool(config.checkpoint.local_dir) != bool(config.checkpoint.local_ckpt_freq):
        raise ConfigError(f"{source}checkpoint.local_dir={config.checkpoint.local_dir!r} and "
                          f"checkpoint.local_ckpt_freq={config.checkpoint.local_ckpt_freq} go together: set both "
                          f"(local copies) or neither")
    if config.batch_size % config.num_microbatches:
        raise ConfigError(f"{source}batch_size={config.batch_size} is not divisible by "
                          f"num_microbatches={config.num_microbatches}")
    if config.full_finetuning and config.frozen_weights != "sharded":
        raise ConfigError(f"{source}frozen_weights={config.frozen_weights!r} needs frozen weights: full_finetuning "
                          f"trains them all")
    if config.ttt.enable and not config.moshi_paths.config_path:  # else the layer count is config.json's
        try:
            parse_ttt_layers(config.ttt.layers, int(config.model.num_layers))
        except ValueError as e:
            raise ConfigError(f"{source}{e}") from None


def check_known(config, *, source: str = "", prefix: str = "") -> None:
    """No key outside the schema (a config built in code may have added one: ConfigDicts accept any)."""
    for name in config.keys():
        key = f"{prefix}{name}"
        entry = lookup(key)
        if entry is None:
            hint = f"; it is {ALIASES[key]} now" if key in ALIASES else ""
            raise ConfigError(f"{source}{key}: no such key{hint}")
        if isinstance(entry, Section):
            check_known(config[name], source=source, prefix=f"{key}.")


def validate(config, *, source: str = "") -> None:
    """No unknown key, every key's check, then the rules that span keys; `source` prefixes the
    messages ("FILE: ")."""
    check_known(config, source=source)
    check_keys(config, source=source)
    check_rules(config, source=source)


# -- --help -----------------------------------------------------------------------------------------
def describe(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` with its value and its comment, one per line."""
    rows = []

    def walk(node, prefix):
        for name in sorted(node.keys()):
            key, value = f"{prefix}{name}", node[name]
            entry = lookup(key)
            comment = entry.comment if entry is not None else ""
            if isinstance(value, ml_collections.ConfigDict):
                rows.append((f"{key}.*", comment))
                walk(value, f"{key}.")
            else:
                rows.append((f"{key} = {value!r}", comment))

    walk(config, "")
    width = min(max(len(line) for line, _ in rows), 40)
    return "\n".join(f"{line:<{width}}  # {comment}" if comment else line for line, comment in rows)
