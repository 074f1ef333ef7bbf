"""Weight gathers of a train step: the analytic minimum for a layout, beside what the compiled program moves.

A weight split over `fsdp` must be gathered before a matmul uses it. Per microbatch, the least a
step can do under remat (no policy saves a weight) is one gather for the
forward and one for the backward (dx = dy W^T; the recomputed forward runs in the same backward
iteration and can share that gather); without remat the forward's gathered weight is a residual
the backward reads, so one gather, as for the weights outside the rematerialised layer stacks
(`REMATTED`: the output heads, depformer_in). An embedding table is gathered once (its lookup has no
backward through the table). Frozen
weights (config `frozen_weights`) change this: `gather_once` gathers them once per step, whatever
the microbatches; `replicated` never. Trainables (LoRA, TTT, gates; everything for full
fine-tuning) are always gathered per pass: their gradients leave by reduce-scatter, not gather.

    minimum_gathers(cfg, mesh_axes, ...)  -> {path: bytes per step}   (one device, gathered-result bytes)
    compiled_gathers(module)               -> {path: bytes per step}   (all-gathers and the collective-permute
                                                                       rings of XLA's windowed einsums whose
                                                                       data is a weight, by data flow)
    reconcile(minimum, compiled)           -> the report `tttjax.compile` writes under `weight_gathers`

Bytes are the collective's result on one device per execution (an all-gather's gathered array, a
collective-permute's received buffer), as in `topology.collectives`, so a bidirectional ring that
passes 17 shards of 16 reads 1.06 gathers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Mapping

from tttjax.analysis import hlo
from tttjax.model.config import ModelConfig
from tttjax.model.params import flat_abstract, trainable
from tttjax.parallel.sharding import frozen_storage_drop, param_spec, without_axes

EMBEDDINGS = ("emb", "text_emb", "depformer_emb", "depformer_text_emb")
REMATTED = ("transformer", "depformer", "ttt")  # the model's parts that config `remat` checkpoints
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# Data movement a weight passes through on its way into a collective (its storage to the gather).
_MOVES = {"bitcast", "copy", "reshape", "transpose", "convert", "dynamic-slice", "slice", "broadcast", "opt-barrier"}


def _axes_of(spec) -> list[str]:
    return [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]


def minimum_gathers(cfg: ModelConfig, mesh_axes: Mapping[str, int], *, full_finetuning: bool = False,
                    num_microbatches: int = 1, frozen_weights: str = "sharded") -> dict[str, int]:
    """{param path: the least all-gather bytes per step on one device}, for params split over fsdp
    (remat: `cfg.remat`)."""
    if mesh_axes.get("fsdp", 1) <= 1:
        return {}
    pbytes = _DTYPE_BYTES[cfg.param_dtype]  # trainables are cast to param_dtype before the forward
    drop = frozen_storage_drop(frozen_weights)
    out = {}
    for path, variable in flat_abstract(cfg).items():
        trains = trainable(path, full_finetuning)
        spec = param_spec(variable, path, mesh_axes)
        if not trains:
            spec = without_axes(spec, drop)
        axes = _axes_of(spec)
        if "fsdp" not in axes:
            continue
        gathered = math.prod(variable.shape) * pbytes // math.prod(mesh_axes[a] for a in axes if a != "fsdp")
        passes = 2 if path[0] in REMATTED and cfg.remat != "none" else 1
        if trains or frozen_weights == "sharded":
            out[".".join(path)] = gathered * passes * num_microbatches
        else:  # gather_once
            out[".".join(path)] = gathered
    return out


def _param_path(op_name: str) -> str | None:
    """`frozen['a']['b']` / `state.params['a']['b']` (an entry parameter's name: JAX names the
    TrainState's field by attribute) -> "a.b"; None otherwise."""
    name = op_name.replace("\\'", "'")
    for prefix in ("frozen", "state.params"):
        if name.startswith(prefix + "["):
            return ".".join(re.findall(r"\['([^']*)'\]", name[len(prefix):]))
    return None


class _Sources:
    """Which weights (entry parameters) the data of an instruction comes from, through data movement:
    views, converts, slices, tuples, loop-invariant while elements, fusion roots and parameters,
    async wrappers and earlier collectives (a permute ring passes the same shards along)."""

    def __init__(self, module: hlo.Module):
        self.module = module
        self.computation = {i.name: c for c, instrs in module.computations.items() for i in instrs}
        self.callers = defaultdict(list)
        for instrs in module.computations.values():
            for ins in instrs:
                for key in ("calls", "body", "condition"):
                    for callee in ins.callees(key):
                        self.callers[callee].append(ins)
        self.memo: dict[tuple[str, int | None], frozenset] = {}

    def __call__(self, name: str, index: int | None = None) -> frozenset:
        key = (name, index)
        if key not in self.memo:
            self.memo[key] = frozenset()  # a cycle (a loop-carried value) adds nothing
            self.memo[key] = frozenset(self._find(name, index))
        return self.memo[key]

    def _root(self, computation: str) -> hlo.Instruction | None:
        return next((i for i in self.module.computations.get(computation, []) if i.root), None)

    def _find(self, name: str, index: int | None) -> set:
        ins = self.module.by_name.get(name)
        if ins is None:
            return set()
        op = ins.opcode
        if op == "parameter":
            computation = self.computation[name]
            if computation == self.module.entry:
                path = _param_path(ins.op_name)
                return {path} if path is not None else set()
            number = int(ins.operand_text) if ins.operand_text.strip().isdigit() else 0
            found = set()
            for caller in self.callers.get(computation, []):
                if caller.opcode == "while":  # the loop's tuple: what it starts with (weights are invariant)
                    found |= self(caller.operands[0], index)
                elif number < len(caller.operands):
                    found |= self(caller.operands[number], index)
            return found
        if op == "get-tuple-element":
            return self(ins.operands[0], int(re.search(r"index=(\d+)", ins.attrs).group(1)))
        if op == "tuple":
            return self(ins.operands[index]) if index is not None and index < len(ins.operands) else set()
        if op == "while":
            root = self._root((ins.callees("body") or [""])[0])
            if root is not None and root.opcode == "tuple" and index is not None:
                return self(root.operands[index])
            return set()
        if ins.callees("calls"):  # fusion, call, async wrapper: what its root is made of
            root = self._root(ins.callees("calls")[0])
            if root is None:
                return set()
            if root.opcode == "tuple" and index is not None and index < len(root.operands):
                return self(root.operands[index])
            return self(root.name, index)
        if (op in _MOVES or op.endswith("-start") or op.endswith("-done") or op in hlo.COLLECTIVES
                or op == "custom-call") and ins.operands:
            return self(ins.operands[0], index if op == "opt-barrier" else None)
        return set()


def compiled_gathers(module: hlo.Module, num_devices: int) -> dict[str, int]:
    """{param path: bytes per step on one device} of the all-gathers and collective-permutes whose data
    is a weight (hlo.collective_ops: loop trip counts applied, async collective chains counted once)."""
    sources = _Sources(module)
    out: dict[str, int] = defaultdict(int)
    for c in hlo.collective_ops(module, num_devices):
        if c.kind not in ("all-gather", "collective-permute") or not c.instruction:
            continue
        ins = module.by_name[c.instruction]
        weights = sources(ins.operands[0]) if ins.operands else frozenset()
        if weights:
            out[min(weights)] += c.bytes * c.times
    return dict(out)


def reconcile(minimum: dict[str, int], compiled: dict[str, int], *, trainable_paths: set[str], top: int = 8) -> dict:
    """The analytic minimum beside the compiled bytes, in total, frozen / trainable, and the params
    most over their minimum."""
    def split(table, which):
        return sum(v for k, v in table.items() if (k in trainable_paths) == (which == "trainable"))

    excess = sorted(((compiled.get(k, 0) - minimum.get(k, 0), k) for k in set(minimum) | set(compiled)), reverse=True)
    total_min, total = sum(minimum.values()), sum(compiled.values())
    return {"minimum_bytes": total_min, "compiled_bytes": total, "ratio": total / total_min if total_min else None,
            "frozen": {"minimum_bytes": split(minimum, "frozen"), "compiled_bytes": split(compiled, "frozen")},
            "trainable": {"minimum_bytes": split(minimum, "trainable"), "compiled_bytes": split(compiled, "trainable")},
            "most_over": [{"param": k, "compiled_bytes": compiled.get(k, 0), "minimum_bytes": minimum.get(k, 0)}
                          for extra, k in excess[:top] if extra > 0]}


def weight_gathers(text: str, cfg: ModelConfig, mesh_axes: Mapping[str, int], *, full_finetuning: bool,
                   num_microbatches: int, frozen_weights: str) -> dict:
    """`reconcile` of a compiled step's optimized HLO against the minimum of its layout."""
    minimum = minimum_gathers(cfg, mesh_axes, full_finetuning=full_finetuning, num_microbatches=num_microbatches,
                              frozen_weights=frozen_weights)
    compiled = compiled_gathers(hlo.parse(text), math.prod(mesh_axes.values()))
    paths = {".".join(p) for p in flat_abstract(cfg) if trainable(p, full_finetuning)}
    return reconcile(minimum, compiled, trainable_paths=paths)


def format_weight_gathers(w: dict) -> str:
    gib = 2 ** 30
    ratio = f"{w['ratio']:.2f} x" if w["ratio"] else "-"
    return (f"weight gathers {w['compiled_bytes'] / gib:.2f} GiB per step per device against an analytic minimum of "
            f"{w['minimum_bytes'] / gib:.2f} GiB ({ratio}; frozen {w['frozen']['compiled_bytes'] / gib:.2f} / "
            f"{w['frozen']['minimum_bytes'] / gib:.2f}, trainable {w['trainable']['compiled_bytes'] / gib:.2f} / "
            f"{w['trainable']['minimum_bytes'] / gib:.2f})")
