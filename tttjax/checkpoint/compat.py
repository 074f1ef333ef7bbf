"""Refuse a checkpoint whose architecture does not match the config, naming every difference."""

from __future__ import annotations

import json

from tttjax.errors import UserError


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(saved_meta: dict, current_meta: dict, *, source: str = "checkpoint") -> None:
    """Raises ValueError listing each dotted key whose saved value differs from the config's.

    `current_meta` goes through a JSON round trip first, as the saved one did (tuples -> lists).
    A key present on one side only is a mismatch too.
    """
    saved = _flatten(saved_meta)
    current = _flatten(json.loads(json.dumps(current_meta)))
    diffs = [
        f"{k}: saved {saved.get(k, _ABSENT)!r} vs config {current.get(k, _ABSENT)!r}"
        for k in sorted(saved.keys() | current.keys())
        if saved.get(k, _ABSENT) != current.get(k, _ABSENT)
    ]
    if diffs:
        raise UserError(f"{source} does not match the config: " + "; ".join(diffs))


# TTT knobs that mean nothing in a model without TTT layers (and LoRA's in one without LoRA).
_TTT_KNOBS = ("ttt_num_heads", "ttt_base_lr", "ttt_mini_batch_size", "ttt_initial_gating_alpha", "ttt_causal")


def effective_architecture(cfg) -> dict:
    """`cfg.architecture()` without the TTT / LoRA knobs of a model that has no TTT layers / no LoRA."""
    arch = cfg.architecture()
    if not cfg.ttt_layers:
        for k in _TTT_KNOBS:
            arch.pop(k, None)
    if not cfg.lora_rank:
        arch.pop("lora_scaling", None)
    return arch


def check_base_compatible(source_cfg, cfg, *, source: str) -> None:
    """Weights of `source_cfg` into a model of `cfg`: everything must match, except that a source
    without TTT layers / LoRA fits any TTT / LoRA of `cfg` (those start fresh)."""
    saved, current = effective_architecture(source_cfg), effective_architecture(cfg)
    fresh = (["ttt_layers", *_TTT_KNOBS] if not source_cfg.ttt_layers else []) + \
        (["lora_rank", "lora_scaling"] if not source_cfg.lora_rank else [])
    for key in fresh:
        saved.pop(key, None)
        current.pop(key, None)
    check_compatible(saved, current, source=source)
