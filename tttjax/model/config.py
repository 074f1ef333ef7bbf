"""Model configuration: the moshi LM config (`lm_kwargs`) plus LoRA, TTT and precision settings.

The moshi config is what moshi-finetune writes as `config.json`; keeping it verbatim (in
`lm_kwargs`) lets an export carry back exactly what came in.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from tttjax.errors import ConfigError

# Values of moshi options that the Flax model implements; anything else is refused by name.
_REQUIRED_LM_OPTIONS = {
    "norm": "rms_norm_f32",
    "gating": "silu",
    "positional_embedding": "rope",
    "depformer_pos_emb": "none",
    "depformer_gating": "silu",
    "depformer_multi_linear": True,
    "depformer_weights_per_step": True,
    "causal": True,
}
_UNSUPPORTED_IF_SET = (
    "depformer_weights_per_step_schedule",
    "depformer_low_rank_embeddings",
    "layer_scale",
    "depformer_layer_scale",
    "conditioners",
    "fuser",
    "cross_attention",
    "text_card_out",
)
_UNSUPPORTED_IF_TRUE = ("demux_second_text_stream", "norm_emb", "bias_proj", "bias_ff", "bias_attn")

# The moshi 7B LM config (moshi.models.loaders._lm_kwargs), used when no config.json is given.
MOSHI_7B_LM_KWARGS = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8,
    "card": 2048, "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True,
    "layer_scale": None, "context": 3000, "max_period": 10000, "gating": "silu",
    "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224, "depformer_num_heads": 16, "depformer_num_layers": 6,
    "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 8,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}

# Defaults of the TTT settings and of LoRA's scaling, in one place: the run config's ttt.* / lora.*
# keys (tttjax/config/schema.py), ModelConfig's fields and config.json's "ttt" block (`read_ttt_block`,
# also used by conversion/torch_ttt.py) all take them from here.
TTT_DEFAULTS = {"base_lr": 1.0, "mini_batch_size": 16, "initial_gating_alpha": 0.1, "causal": True,
                "scan_remat_group": 1, "num_heads": 0}
LORA_SCALING = 2.0
# The implementations of the temporal attention over whole sequences (model/attention.py).
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash", "cudnn")
DEFAULT_ATTENTION_IMPL = "auto"
# Per-layer rematerialisation (model/transformer.py): none keeps every activation, full only each
# layer's input, dots every weight matmul's output, save_qkv the input and the q/k/v projections
# (attention and TTT), so the backward uses their weights once, for dx.
REMAT_MODES = ("none", "full", "dots", "save_qkv")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str):
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def check_attention_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")


def ffn_hidden(dim: int, dim_feedforward: int) -> int:
    """Hidden width of moshi's SiLU-GLU (modules/gating.py `make_gating`)."""
    if dim_feedforward == 4 * dim:
        return 21 * dim // 8
    return 2 * dim_feedforward // 3


def parse_ttt_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`ttt.layers` spec ("1,5,10", "all", "middle" = [L/4, 3L/4), "none"/"") -> sorted 0-based indices."""
    text = str(spec).strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return tuple(range(num_layers))
    if text == "middle":
        return tuple(range(num_layers // 4, 3 * num_layers // 4))
    where = f"ttt.layers={spec!r} (num_layers={num_layers})"
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{where}: expected comma-separated layer indices, 'all', 'middle' or 'none'") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{where}: layer indices {bad} out of range [0, {num_layers})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{where}: duplicate layer indices")
    return tuple(sorted(layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the Flax model; hashable so it can be a static jit argument."""

    dim: int
    num_heads: int
    num_layers: int
    hidden_scale: float
    context: int | None
    max_period: float
    text_card: int
    card: int
    n_q: int
    dep_q: int
    delays: tuple[int, ...]
    depformer_dim: int
    depformer_dim_feedforward: int
    depformer_num_heads: int
    depformer_num_layers: int
    depformer_context: int | None
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    lora_rank: int = 0  # 0 = no LoRA
    lora_scaling: float = LORA_SCALING
    ttt_layers: tuple[int, ...] = ()
    ttt_num_heads: int = TTT_DEFAULTS["num_heads"]  # 0 = the temporal heads
    ttt_base_lr: float = TTT_DEFAULTS["base_lr"]
    ttt_mini_batch_size: int = TTT_DEFAULTS["mini_batch_size"]
    ttt_initial_gating_alpha: float = TTT_DEFAULTS["initial_gating_alpha"]
    ttt_causal: bool = TTT_DEFAULTS["causal"]
    ttt_scan_remat_group: int = TTT_DEFAULTS["scan_remat_group"]
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # per-layer rematerialisation: REMAT_MODES
    unroll_layers: bool = False  # unroll the layer stacks instead of a lax.scan loop (faster steps, longer compiles)
    attention_impl: str = DEFAULT_ATTENTION_IMPL  # ATTENTION_IMPLS (no effect on params)
    lm_kwargs: tuple = ()  # the original moshi config, as sorted (key, json) items

    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    @property
    def hidden(self) -> int:
        return ffn_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden(self) -> int:
        return ffn_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ttt_heads(self) -> int:
        return self.ttt_num_heads or self.num_heads

    @property
    def jnp_dtype(self):
        return parse_dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return parse_dtype(self.param_dtype)

    def raw_lm_kwargs(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.lm_kwargs}

    def ttt_dict(self) -> dict[str, Any]:
        """The `"ttt"` block of config.json (docs/contract.md §7)."""
        return {
            "enable": bool(self.ttt_layers),
            "layers": ",".join(str(i) for i in self.ttt_layers) or "none",
            "base_lr": self.ttt_base_lr,
            "mini_batch_size": self.ttt_mini_batch_size,
            "causal": self.ttt_causal,
            "initial_gating_alpha": self.ttt_initial_gating_alpha,
            "num_heads": self.ttt_heads,
        }

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be loaded into this model (dtypes excluded)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("param_dtype", "dtype", "remat", "unroll_layers", "lm_kwargs", "ttt_scan_remat_group",
                                 "attention_impl")}
        out["ttt_num_heads"] = self.ttt_heads
        out["delays"] = list(self.delays)
        out["ttt_layers"] = list(self.ttt_layers)
        return out


def from_lm_kwargs(lm_kwargs: dict[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
    """Validate a moshi LM config and build a ModelConfig; `overrides` set LoRA/TTT/dtype fields."""
    for key, expected in _REQUIRED_LM_OPTIONS.items():
        if key in lm_kwargs and lm_kwargs[key] != expected:
            raise ConfigError(f"{source}: {key}={lm_kwargs[key]!r} is not supported (tttjax implements {expected!r})")
    for key in _UNSUPPORTED_IF_SET:
        if lm_kwargs.get(key) not in (None, {}, []):
            raise ConfigError(f"{source}: {key}={lm_kwargs[key]!r} is not supported")
    for key in _UNSUPPORTED_IF_TRUE:
        if lm_kwargs.get(key):
            raise ConfigError(f"{source}: {key}=true is not supported")
    missing = [k for k in ("dim", "num_heads", "num_layers", "n_q", "dep_q", "card", "text_card",
                           "delays", "depformer_dim", "depformer_num_heads", "depformer_num_layers")
               if k not in lm_kwargs]
    if missing:
        raise ConfigError(f"{source}: missing moshi LM keys {missing}")
    dim = int(lm_kwargs["dim"])
    n_q, dep_q = int(lm_kwargs["n_q"]), int(lm_kwargs["dep_q"])
    delays = tuple(int(d) for d in lm_kwargs["delays"])
    if len(delays) != n_q + 1:
        raise ConfigError(f"{source}: delays has {len(delays)} entries, expected n_q + 1 = {n_q + 1}")
    if dim % int(lm_kwargs["num_heads"]):
        raise ConfigError(f"{source}: dim={dim} is not divisible by num_heads={lm_kwargs['num_heads']}")
    depformer_dim = int(lm_kwargs["depformer_dim"])
    dep_ff = lm_kwargs.get("depformer_dim_feedforward")
    if isinstance(dep_ff, list):
        raise ConfigError(f"{source}: a per-layer depformer_dim_feedforward list is not supported")
    cfg = ModelConfig(
        dim=dim,
        num_heads=int(lm_kwargs["num_heads"]),
        num_layers=int(lm_kwargs["num_layers"]),
        hidden_scale=float(lm_kwargs.get("hidden_scale", 4)),
        context=lm_kwargs.get("context"),
        max_period=float(lm_kwargs.get("max_period", 10000)),
        text_card=int(lm_kwargs["text_card"]),
        card=int(lm_kwargs["card"]),
        n_q=n_q,
        dep_q=dep_q,
        delays=delays,
        depformer_dim=depformer_dim,
        depformer_dim_feedforward=int(dep_ff if dep_ff is not None else 4 * depformer_dim),
        depformer_num_heads=int(lm_kwargs["depformer_num_heads"]),
        depformer_num_layers=int(lm_kwargs["depformer_num_layers"]),
        depformer_context=lm_kwargs.get("depformer_context"),
        existing_text_padding_id=int(lm_kwargs.get("existing_text_padding_id", 3)),
        existing_text_end_padding_id=int(lm_kwargs.get("existing_text_end_padding_id", 0)),
        lm_kwargs=tuple(sorted((k, json.dumps(v)) for k, v in lm_kwargs.items())),
    )
    return validate(dataclasses.replace(cfg, **overrides))


def validate(cfg: ModelConfig) -> ModelConfig:
    """Checks that span several fields; one-line errors naming the parameter."""
    if cfg.lora_rank < 0:
        raise ConfigError(f"lora.rank={cfg.lora_rank} must be >= 0")
    if cfg.ttt_layers:
        if cfg.ttt_mini_batch_size < 1:
            raise ConfigError(f"ttt.mini_batch_size={cfg.ttt_mini_batch_size} must be >= 1")
        if cfg.ttt_scan_remat_group < 1:
            raise ConfigError(f"ttt.scan_remat_group={cfg.ttt_scan_remat_group} must be >= 1")
        if cfg.dim % cfg.ttt_heads:
            raise ConfigError(f"ttt.num_heads={cfg.ttt_heads} does not divide dim={cfg.dim}")
        bad = [i for i in cfg.ttt_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ConfigError(f"ttt.layers {bad} out of range for num_layers={cfg.num_layers}")
    check_attention_impl(cfg.attention_impl)
    if cfg.remat not in REMAT_MODES:
        raise ConfigError(f"model remat={cfg.remat!r}: expected one of {', '.join(REMAT_MODES)}")
    parse_dtype(cfg.dtype)
    parse_dtype(cfg.param_dtype)
    if cfg.dep_q > cfg.n_q:
        raise ConfigError(f"dep_q={cfg.dep_q} exceeds n_q={cfg.n_q}")
    if not math.isfinite(cfg.ttt_base_lr):
        raise ConfigError(f"ttt.base_lr={cfg.ttt_base_lr} is not finite")
    return cfg


_ADAPTER_KEYS = ("lora", "lora_rank", "lora_scaling", "ttt")
# Keys of a run config's `model` block that are tttjax settings, not moshi LM options (never in config.json).
RUN_MODEL_KEYS = ("attention_impl",)
# The keys of config.json's "ttt" block (`ttt_dict` writes all but scan_remat_group, a training setting).
TTT_KEYS = ("enable", "layers", *TTT_DEFAULTS)


def read_ttt_block(ttt: dict | None, *, source: str) -> dict[str, Any]:
    """config.json's "ttt" block with every key (TTT_DEFAULTS where it is silent); unknown keys, or
    TTT enabled without its layers, are refused naming `source`."""
    ttt = dict(ttt or {})
    unknown = set(ttt) - set(TTT_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys in the 'ttt' block: {sorted(unknown)}")
    if ttt.get("enable") and "layers" not in ttt:
        raise ConfigError(f"{source}: the 'ttt' block enables TTT but names no layers")
    return {"enable": bool(ttt.get("enable")), "layers": ttt.get("layers", "none"), **TTT_DEFAULTS,
            **{k: v for k, v in ttt.items() if k in TTT_DEFAULTS}}


def to_config_json(cfg: ModelConfig, *, lora: bool | None = None) -> dict[str, Any]:
    """config.json as moshi-finetune writes it (LM config + lora keys) plus, with TTT layers, the
    `"ttt"` block: stock moshi (`get_moshi_lm`, `moshi.server --config-path`) rejects that key, so a
    model without TTT gets none and loads there.

    `lora=False` is for merged exports: moshi would otherwise wrap the merged weights in fresh LoRA
    layers with non-zero B.
    """
    has_lora = cfg.lora_rank > 0 if lora is None else lora
    out = cfg.raw_lm_kwargs()
    out.update(lora=has_lora)
    if cfg.ttt_layers:
        out.update(ttt=cfg.ttt_dict())
    if has_lora:
        out.update(lora_rank=cfg.lora_rank, lora_scaling=cfg.lora_scaling)
    return out


def from_config_json(data: dict[str, Any], *, source: str = "config.json", lora_rank: int | None = None,
                     **overrides) -> ModelConfig:
    """Inverse of to_config_json; `lora_rank` overrides what the file says (e.g. inferred from weights)."""
    lm_kwargs = {k: v for k, v in data.items() if k not in _ADAPTER_KEYS}
    if lora_rank is None:
        lora_rank = int(data.get("lora_rank", 0)) if data.get("lora") else 0
    fields: dict[str, Any] = dict(lora_rank=lora_rank, lora_scaling=float(data.get("lora_scaling", LORA_SCALING)))
    ttt = read_ttt_block(data.get("ttt"), source=source)
    if ttt["enable"]:
        fields.update(
            ttt_layers=parse_ttt_layers(ttt["layers"], int(lm_kwargs["num_layers"])),
            ttt_base_lr=float(ttt["base_lr"]),
            ttt_mini_batch_size=int(ttt["mini_batch_size"]),
            ttt_causal=bool(ttt["causal"]),
            ttt_initial_gating_alpha=float(ttt["initial_gating_alpha"]),
            ttt_num_heads=int(ttt["num_heads"]),
        )
    fields.update(overrides)
    return from_lm_kwargs(lm_kwargs, source=source, **fields)


def from_run_config(config) -> ModelConfig:
    """The model a training config describes: `model` (or the moshi config.json at
    moshi_paths.config_path) plus its lora / ttt blocks and precision settings."""
    if config.moshi_paths.config_path:
        path = Path(config.moshi_paths.config_path)
        if not path.is_file():
            raise FileNotFoundError(f"moshi_paths.config_path: {path} not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"moshi_paths.config_path: {path}: invalid JSON ({e})") from None
        lm_kwargs = {k: v for k, v in data.items() if k not in _ADAPTER_KEYS}
        source = str(path)
    else:
        lm_kwargs, source = config.model.to_dict(), "config.model"
    lm_kwargs = {k: v for k, v in lm_kwargs.items() if k not in RUN_MODEL_KEYS}
    ttt = config.ttt
    ttt_layers = parse_ttt_layers(ttt.layers, int(lm_kwargs["num_layers"])) if ttt.enable else ()
    return from_lm_kwargs(
        lm_kwargs, source=source,
        lora_rank=config.lora.rank if config.lora.enable else 0, lora_scaling=config.lora.scaling,
        ttt_layers=ttt_layers, ttt_num_heads=ttt.num_heads, ttt_base_lr=ttt.base_lr,
        ttt_mini_batch_size=ttt.mini_batch_size, ttt_initial_gating_alpha=ttt.initial_gating_alpha,
        ttt_causal=ttt.causal, ttt_scan_remat_group=ttt.scan_remat_group,
        param_dtype=config.param_dtype, dtype=config.dtype, remat=config.remat,
        unroll_layers=config.unroll_layers, attention_impl=config.model.attention_impl)
