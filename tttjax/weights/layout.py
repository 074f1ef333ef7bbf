"""The one name table between the Flax parameter tree and the PyTorch (moshi) safetensors layout.

Every PyTorch tensor is one `Row`: its name, the Flax parameter it lives in, which slices of that
(stacked) parameter it holds, and how the values are transformed. Import and export both walk
these rows, tensor by tensor.

Layouts (docs/contract.md §7):
  "moshi"   - moshi's in-memory names, what moshi-finetune writes (`self_attn.in_projs.S.weight`).
  "release" - the released/fused names (`self_attn.in_proj_weight`, `self_attn.out_proj.weight`,
              the depformer's per-step attention matrices concatenated on dim 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tttjax.errors import UserError
from tttjax.model.config import ModelConfig

LAYOUTS = ("moshi", "release")

# How a Flax value becomes the torch value: "kernel" transposes [in, out] -> [out, in];
# "alpha" reshapes a norm vector [D] -> (1, 1, D); "plain" copies.
KINDS = ("kernel", "alpha", "plain")

# TTT tensor names inside `...seq_modeling_block.ttt_layer.ttt.` and their Flax paths below `ttt`.
_TTT_TENSORS = {
    "W1": ("ttt", "W1"), "b1": ("ttt", "b1"), "W2": ("ttt", "W2"), "b2": ("ttt", "b2"),
    "learnable_ttt_lr_weight": ("ttt", "learnable_ttt_lr_weight"),
    "learnable_ttt_lr_bias": ("ttt", "learnable_ttt_lr_bias"),
    "ttt_norm_weight": ("ttt", "ttt_norm_weight"), "ttt_norm_bias": ("ttt", "ttt_norm_bias"),
    "post_norm.weight": ("ttt", "post_norm", "scale"), "post_norm.bias": ("ttt", "post_norm", "bias"),
    **{f"{p}.weight": ("ttt", p, "kernel") for p in ("wq", "wk", "wv", "wo")},
    **{f"{p}.bias": ("ttt", p, "bias") for p in ("wq", "wk", "wv", "wo")},
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # PyTorch tensor name
    path: tuple[str, ...]  # Flax parameter path (nnx state path)
    index: tuple[tuple[int, ...], ...]  # slices of the Flax param; several = concatenated on torch dim 0
    kind: str  # see KINDS
    group: str  # "base", "lora" or "ttt": what an adapters-only file holds

    def to_torch(self, read) -> np.ndarray:
        """The torch value from `read(index)`, the Flax param's slice at each of this row's indices."""
        parts = [_forward(read(idx), self.kind) for idx in self.index]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        one = _forward(np.empty(flax_shape[len(self.index[0]):], np.int8), self.kind).shape
        return (one[0] * len(self.index),) + tuple(one[1:]) if len(self.index) > 1 else tuple(one)

    def from_torch(self, torch_value: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """(index, Flax value) pairs to write into the Flax param."""
        parts = np.split(torch_value, len(self.index), axis=0) if len(self.index) > 1 else [torch_value]
        return [(idx, _backward(part, self.kind)) for idx, part in zip(self.index, parts)]


def transpose(value: np.ndarray, block: int = 256) -> np.ndarray:
    """A contiguous copy of `value` with its last two axes swapped, in cache-sized tiles of raw
    unsigned ints: numpy's strided copy of a large bf16 matrix runs ~6x slower (0.18 vs 1.1 GB/s
    on a 7B kernel; bfloat16's own copy loop alone costs 2.5x)."""
    if value.ndim != 2 or value.size < block * block or value.dtype.itemsize not in (1, 2, 4, 8):
        return np.ascontiguousarray(np.swapaxes(value, -1, -2))
    raw = value.view(f"u{value.dtype.itemsize}")
    rows, cols = value.shape
    out = np.empty((cols, rows), raw.dtype)
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            out[j:j + block, i:i + block] = raw[i:i + block, j:j + block].T
    return out.view(value.dtype)


def _forward(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel":
        return transpose(value)
    if kind == "alpha":
        return value.reshape(1, 1, -1)
    return value


def _backward(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel":
        return transpose(value)
    if kind == "alpha":
        return value.reshape(-1)
    return value


def _linear_rows(name: str, path: tuple[str, ...], index, lora: bool, group: str = "base") -> list[Row]:
    """A moshi Linear: `name.weight` (+ `name.lora_A.weight`, `name.lora_B.weight` with LoRA)."""
    rows = [Row(f"{name}.weight", path + ("kernel",), index, "kernel", group)]
    if lora:
        rows.append(Row(f"{name}.lora_A.weight", path + ("lora_a",), index, "kernel", "lora"))
        rows.append(Row(f"{name}.lora_B.weight", path + ("lora_b",), index, "kernel", "lora"))
    return rows


def _fused_rows(name: str, path: tuple[str, ...], index, lora: bool) -> list[Row]:
    """The release layout's fused attention projection: one tensor for all steps (concatenated on dim 0)."""
    rows = [Row(name if name.endswith("_weight") else f"{name}.weight", path + ("kernel",), index, "kernel", "base")]
    if lora:  # moshi's load hook maps `in_proj.lora_A` -> `in_projs.{i}.lora_A`; fused the same way
        stem = name.removesuffix("_weight")
        rows.append(Row(f"{stem}.lora_A.weight", path + ("lora_a",), index, "kernel", "lora"))
        rows.append(Row(f"{stem}.lora_B.weight", path + ("lora_b",), index, "kernel", "lora"))
    return rows


def rows(cfg: ModelConfig, layout: str = "moshi") -> list[Row]:
    """All tensors of a model with this config, in the given PyTorch layout."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    lora = cfg.lora_rank > 0
    S = cfg.dep_q
    out = [Row(f"emb.{i}.weight", ("emb",), ((i,),), "plain", "base") for i in range(cfg.n_q)]
    out.append(Row("text_emb.weight", ("text_emb",), ((),), "plain", "base"))
    out += _linear_rows("text_linear", ("text_linear",), ((),), lora)
    out.append(Row("out_norm.alpha", ("out_norm", "alpha"), ((),), "alpha", "base"))
    for l in range(cfg.num_layers):
        p = f"transformer.layers.{l}"
        at = ((l,),)
        for norm in ("norm1", "norm2"):
            out.append(Row(f"{p}.{norm}.alpha", ("transformer", norm, "alpha"), at, "alpha", "base"))
        if layout == "moshi":
            out += _linear_rows(f"{p}.self_attn.in_projs.0", ("transformer", "self_attn", "in_proj"), at, lora)
            out += _linear_rows(f"{p}.self_attn.out_projs.0", ("transformer", "self_attn", "out_proj"), at, lora)
        else:
            out += _fused_rows(f"{p}.self_attn.in_proj_weight", ("transformer", "self_attn", "in_proj"), at, lora)
            out += _fused_rows(f"{p}.self_attn.out_proj", ("transformer", "self_attn", "out_proj"), at, lora)
        for lin in ("linear_in", "linear_out"):
            out += _linear_rows(f"{p}.gating.{lin}", ("transformer", "gating", lin), at, lora)
    for j, l in enumerate(cfg.ttt_layers):
        p = f"transformer.layers.{l}.seq_modeling_block"
        for name, sub in _TTT_TENSORS.items():
            kind = "kernel" if name.endswith(".weight") and name[:2] in ("wq", "wk", "wv", "wo") else "plain"
            out.append(Row(f"{p}.ttt_layer.ttt.{name}", ("ttt",) + sub, ((j,),), kind, "ttt"))
        out.append(Row(f"{p}.forward_ssm_gating.gating_alpha", ("ttt", "gating_alpha"), ((j,),), "plain", "ttt"))
    out += [row for s in range(S) for row in _linear_rows(f"depformer_in.{s}", ("depformer_in",), ((s,),), lora)]
    out.append(Row("depformer_text_emb.weight", ("depformer_text_emb",), ((),), "plain", "base"))
    out += [Row(f"depformer_emb.{i}.weight", ("depformer_emb",), ((i,),), "plain", "base") for i in range(S - 1)]
    for l in range(cfg.depformer_num_layers):
        p = f"depformer.layers.{l}"
        for norm in ("norm1", "norm2"):
            out.append(Row(f"{p}.{norm}.alpha", ("depformer", norm, "alpha"), ((l,),), "alpha", "base"))
        for proj, fused in (("in_proj", f"{p}.self_attn.in_proj_weight"), ("out_proj", f"{p}.self_attn.out_proj")):
            path = ("depformer", "self_attn", proj)
            if layout == "moshi":
                for s in range(S):
                    out += _linear_rows(f"{p}.self_attn.{proj}s.{s}", path, ((l, s),), lora)
            else:
                out += _fused_rows(fused, path, tuple((l, s) for s in range(S)), lora)
        for s in range(S):
            for lin in ("linear_in", "linear_out"):
                out += _linear_rows(f"{p}.gating.{s}.{lin}", ("depformer", "gating", lin), ((l, s),), lora)
    out += [row for s in range(S) for row in _linear_rows(f"linears.{s}", ("linears",), ((s,),), lora)]
    return out


def detect_layout(names) -> str:
    """'release' if the file uses fused attention names, else 'moshi'."""
    return "release" if any(n.endswith("self_attn.in_proj_weight") for n in names) else "moshi"
