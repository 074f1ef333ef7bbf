"""The optimized HLO of a compiled program (`compiled.as_text()`), walked once per step.

XLA's `cost_analysis()` counts a while loop's body once; a train step is mostly loops (the layer
scan, the TTT inner scan, microbatches), so this walk applies every loop's trip count
(`known_trip_count`, which XLA writes on the loops it has analysed, else the bound in the loop's
condition) and yields what each top-level operation costs per step:

    module = parse(text)
    for op in ops(module): ...        # one `Op` per top-level instruction that does work
    for c in collective_ops(module): ...  # one `Collective` per collective instruction

`Op`: `times` (executions per step), `dots` (every dot / convolution / cuBLAS gemm inside it with
its FLOPs and its (batch, M, K, N) shape), `other_flops` (elementwise and reductions, one per element),
`hbm_bytes` (what it reads and writes in device memory per execution: operands and results,
slice-aware for fusion parameters, in-place for dynamic-update-slice, arrays in on-chip memory
spaces excluded), `kernel` (a custom call XLA cannot see into, e.g. a Pallas kernel, with its
operand shapes), `functions` (the Python functions that built it, innermost first, from the HLO's
stack-frame table). `Collective`: kind, result bytes per execution, device groups, `times`, and
whether it is a cross-slice (DCN) transfer handed to the Megascale runtime.
topology.collectives aggregates the collectives by mesh axis; perf.py turns all of it into time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from functools import cached_property

import numpy as np

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(pred|token|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (views, control, bookkeeping).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "copy-done", "opt-barrier", "add-dependency", "domain",
         "send-done", "recv-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
         "async-done", "async-update"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "remainder", "atan2",
                "exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "rsqrt", "sqrt",
                "cbrt", "sine", "cosine", "tan", "negate", "abs", "sign", "floor", "ceil", "round-nearest-even",
                "round-nearest-afz", "compare", "select", "clamp", "and", "or", "xor", "not", "erf"}
_REDUCTIONS = {"reduce", "reduce-window", "scatter", "select-and-scatter"}


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    memory_space: int  # 0: device memory (HBM); TPU's S(1) is on-chip VMEM, S(2..) semaphores / SMEM

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> int:
        bits = _BITS.get(self.dtype) or int(re.sub(r"\D", "", self.dtype.split("e")[0]) or 8)
        return self.elements * bits // 8


def arrays(type_text: str) -> list[Array]:
    """The arrays of an HLO type (`f32[2,3]{1,0}` or a tuple of them), in order."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


@dataclasses.dataclass
class Instruction:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    operand_text: str  # the operand list as printed (a constant's value)
    attrs: str  # everything after the operand list (attributes, metadata, backend config)
    root: bool = False

    @cached_property
    def outputs(self) -> list[Array]:
        return arrays(self.type_text)

    def attr(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^,\s]+)", self.attrs)
        return match.group(1) if match else None

    def callees(self, key: str) -> list[str]:
        value = self.attr(key)
        return [v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip()] if value else []

    @property
    def stack_frame(self) -> int:
        match = re.search(r"stack_frame_id=(\d+)", self.attrs)
        return int(match.group(1)) if match else 0

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attrs)
        return match.group(1) if match else ""


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group opening at text[start]."""
    depth, i = 0, start
    pairs = {"(": ")", "{": "}", "[": "]"}
    closing = set(pairs.values())
    while i < len(text):
        ch = text[i]
        if ch in pairs:
            depth += 1
        elif ch in closing:
            depth -= 1
            if depth == 0:
                return i + 1
        elif ch == '"':
            i = text.index('"', i + 1)
        i += 1
    return len(text)


def _instruction(root: bool, name: str, rest: str) -> Instruction | None:
    rest = rest.strip()
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    opcode = re.match(r"([\w\-]+)\(", rest)
    if not opcode:
        return None
    close = _balanced(rest, opcode.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[opcode.end():close - 1])
    return Instruction(name, type_text, opcode.group(1), operands, rest[opcode.end():close - 1], rest[close:], root)


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str
    functions: dict[int, tuple[tuple[str, str], ...]]  # stack frame -> ((file, function), ...) innermost first
    _users: dict = dataclasses.field(default_factory=dict, repr=False)

    @cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for instrs in self.computations.values() for i in instrs}

    @cached_property
    def executions(self) -> dict[str, int]:
        """How many times each computation runs per execution of the entry: while bodies x their trip
        count; fusions, calls, async wrappers and conditional branches as often as their caller (a
        conditional's branches all count: an upper bound). Reducers (to_apply) are not visited."""
        counts: dict[str, int] = defaultdict(int)

        def visit(name: str, times: int, depth: int = 0) -> None:
            if depth > 64 or name not in self.computations:
                return
            counts[name] += times
            for ins in self.computations[name]:
                if ins.opcode == "while":
                    condition = ins.callees("condition")
                    trip = counted_trips(self, ins)
                    if trip is None:
                        trip = trip_count(ins, self.computations.get(condition[0], []) if condition else [])
                    for body in ins.callees("body"):
                        visit(body, times * trip, depth + 1)
                for key in ("calls", "branch_computations", "true_computation", "false_computation"):
                    for callee in ins.callees(key):
                        visit(callee, times, depth + 1)

        visit(self.entry, 1)
        return counts

    def users(self, computation: str) -> dict[str, list[Instruction]]:
        """{instruction name: the instructions of `computation` that use it} (cached)."""
        if computation not in self._users:
            self._users[computation] = _users(self.computations.get(computation, []))
        return self._users[computation]

    @cached_property
    def fused(self) -> set[str]:
        """Computations that run inside one kernel (fusion bodies): their instructions move no HBM bytes."""
        return {c for instrs in self.computations.values() for i in instrs if i.opcode == "fusion"
                for c in i.callees("calls")}

    def shape(self, name: str) -> list[Array]:
        ins = self.by_name.get(name)
        return ins.outputs if ins else []


def parse(text: str) -> Module:
    """Split the HLO text into computations of instructions (an instruction may span lines: a
    kernel's metadata JSON), and read its stack-frame tables."""
    comps: dict[str, list[Instruction]] = {}
    entry, current, pending = None, None, None

    def flush():
        if pending is not None and current is not None:
            ins = _instruction(*pending)
            if ins is not None:
                comps[current].append(ins)

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            flush()
            pending, current = None, header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
            continue
        if current is None:
            continue
        if line.strip() == "}":
            flush()
            pending, current = None, None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            flush()
            pending = (bool(match.group(1)), match.group(2), match.group(3))
        elif pending is not None:
            pending = (pending[0], pending[1], pending[2] + "\n" + line)
    flush()
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(comps, entry, _stack_frames(text))


def _table(text: str, title: str) -> str:
    match = re.search(rf"^{title}\n(.*?)(?=^\D|\Z)", text, re.S | re.M)
    return match.group(1) if match else ""


def _stack_frames(text: str) -> dict[int, tuple[tuple[str, str], ...]]:
    """{stack_frame_id: ((file, function), ...)} innermost first. XLA prints each frame's parent as
    its id + 1 (0: none), which is what the chains below follow."""
    files = {int(a): b for a, b in re.findall(r'^(\d+) "(.*)"$', _table(text, "FileNames"), re.M)}
    names = {int(a): b for a, b in re.findall(r'^(\d+) "(.*)"$', _table(text, "FunctionNames"), re.M)}
    locations = {int(a): (files.get(int(f), ""), names.get(int(g), "")) for a, f, g in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", _table(text, "FileLocations"), re.M)}
    frames = {int(a): (int(loc), int(parent)) for a, loc, parent in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", _table(text, "StackFrames"), re.M)}
    out = {}
    for frame in frames:
        chain, seen, i = [], set(), frame
        while i in frames and i not in seen:
            seen.add(i)
            location, parent = frames[i]
            chain.append(locations.get(location, ("", "")))
            i = parent - 1
        out[frame] = tuple(chain)
    return out


def trip_count(while_ins: Instruction, condition: list[Instruction]) -> int:
    """A loop's count: XLA's `known_trip_count` where it annotates the while, else the bound the
    condition compares the counter with (its largest integer constant); 1 where neither is found."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_ins.attrs)
    if known:
        return int(known.group(1))
    values = [int(ins.operand_text) for ins in condition if ins.opcode == "constant"
              and re.match(r"s32\[\]", ins.type_text) and ins.operand_text.strip().isdigit()]
    return max(values, default=1)


def _through_copies(module: "Module", name: str) -> Instruction | None:
    ins = module.by_name.get(name)
    while ins is not None and ins.opcode == "copy" and ins.operands:
        ins = module.by_name.get(ins.operands[0])
    return ins


def counted_trips(module: "Module", while_ins: Instruction) -> int | None:
    """The trips of a loop XLA did not annotate, from its induction variable: the condition compares
    tuple element k with a constant bound, the loop starts k at a constant and its body adds a
    constant step (XLA:TPU's windowed-einsum loops count u32 from 0 by 2: a bound of 8 is 4 trips).
    None where the loop has another form, or a `known_trip_count`."""
    if "known_trip_count" in while_ins.attrs:
        return None
    condition = module.computations.get((while_ins.callees("condition") or [""])[0], [])
    body = module.computations.get((while_ins.callees("body") or [""])[0], [])
    local = {i.name: i for i in condition}
    root = next((i for i in condition if i.root), None)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    counter, bound = (local.get(o) for o in root.operands)
    direction = re.search(r"direction=(\w+)", root.attrs)
    if not (counter and bound and direction and counter.opcode == "get-tuple-element" and bound.opcode == "constant"
            and direction.group(1) in ("LT", "LE", "NE") and bound.operand_text.strip().isdigit()):
        return None
    k = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    init_tuple = module.by_name.get(while_ins.operands[0]) if while_ins.operands else None
    start = _through_copies(module, init_tuple.operands[k]) if init_tuple is not None and \
        init_tuple.opcode == "tuple" and k < len(init_tuple.operands) else None
    body_local = {i.name: i for i in body}
    body_root = next((i for i in body if i.root), None)
    update = body_local.get(body_root.operands[k]) if body_root is not None and body_root.opcode == "tuple" and \
        k < len(body_root.operands) else None
    if start is None or start.opcode != "constant" or not start.operand_text.strip().isdigit() or \
            update is None or update.opcode != "add":
        return None
    steps = [int(body_local[o].operand_text) for o in update.operands
             if o in body_local and body_local[o].opcode == "constant" and body_local[o].operand_text.strip().isdigit()]
    if len(steps) != 1 or steps[0] < 1:
        return None
    span = int(bound.operand_text) - int(start.operand_text) + (direction.group(1) == "LE")
    return max(0, -(-span // steps[0]))


# ----------------------------------------------------------------------------------------------
# What each instruction costs


@dataclasses.dataclass(frozen=True)
class Dot:
    flops: float  # per execution
    batch: int  # independent matmuls
    m: int
    k: int
    n: int
    functions: tuple[tuple[str, str], ...]  # the dot's own source


@dataclasses.dataclass
class Op:
    computation: str
    name: str
    opcode: str
    times: int
    hbm_bytes: int  # per execution
    dots: list[Dot]
    other_flops: float  # per execution
    functions: tuple[tuple[str, str], ...]
    kernel: dict | None = None  # custom call: {"target", "op_name", "operands": [{dtype, dims}], "metadata"}


def dot_shape(ins: Instruction, lhs: list[Array], rhs: list[Array]) -> tuple[int, int, int, int]:
    """(batch, M, K, N) of an HLO dot from its dimension numbers, or of a cuBLAS gemm custom call
    from the dot_dimension_numbers of its backend config."""
    gemm = re.search(r'"dot_dimension_numbers":\{([^}]*)\}', ins.attrs) if ins.opcode == "custom-call" else None

    def dims(key):
        if gemm:
            found = re.search(rf'"{key.replace("_dims", "_dimensions")}":\[([^\]]*)\]', gemm.group(1))
            return [int(d) for d in re.findall(r"\d+", found.group(1))] if found else []
        return [int(d) for d in re.findall(r"\d+", ins.attr(key) or "")]
    l, r = lhs[0].dims, rhs[0].dims
    lb, lc, rb, rc = dims("lhs_batch_dims"), dims("lhs_contracting_dims"), dims("rhs_batch_dims"), \
        dims("rhs_contracting_dims")
    batch = math.prod(l[d] for d in lb)
    k = math.prod(l[d] for d in lc)
    m = math.prod(s for d, s in enumerate(l) if d not in lb and d not in lc)
    n = math.prod(s for d, s in enumerate(r) if d not in rb and d not in rc)
    return batch, m, k, n


def _window(ins: Instruction, rank: int) -> list[dict]:
    """Per spatial dimension: size, stride, pad (lo, hi), lhs/rhs dilation (XLA's defaults where unset)."""
    text = re.search(r"window=\{([^}]*)\}", ins.attrs)
    fields = dict(re.findall(r"(\w+)=(\S+)", text.group(1))) if text else {}
    out = []
    for d in range(rank):
        def part(key, default):
            values = fields.get(key)
            return values.split("x")[d] if values else default
        lo, hi = (part("pad", "0_0")).split("_")
        out.append({"size": int(part("size", "1")), "stride": int(part("stride", "1")), "lo": int(lo), "hi": int(hi),
                    "lhs_dilate": int(part("lhs_dilate", "1")), "rhs_dilate": int(part("rhs_dilate", "1"))})
    return out


def _valid_taps(size_in: int, size_out: int, w: dict) -> int:
    """(output position, window tap) pairs of one spatial dimension that land on a real input element
    (not padding, not a hole of the lhs dilation): the multiply-adds a convolution does there."""
    span, stride, dilate = (size_in - 1) * w["lhs_dilate"], w["stride"], w["lhs_dilate"]
    total = 0
    for k in range(w["size"]):
        c = k * w["rhs_dilate"] - w["lo"]  # the input position output 0 reads at tap k
        lo, hi = max(0, -(c // stride)), min(size_out - 1, (span - c) // stride)  # 0 <= o*stride + c <= span
        if hi < lo:
            continue
        if dilate == 1:
            total += hi - lo + 1
            continue
        g = math.gcd(stride, dilate)
        if c % g:
            continue  # o * stride + c never lands on a real element
        period = dilate // g  # solutions of o * stride + c = 0 (mod dilate) repeat every `period` outputs
        o0 = (-c // g) * pow(stride // g, -1, period) % period if period > 1 else 0
        first = lo + (o0 - lo) % period
        if first <= hi:
            total += (hi - first) // period + 1
    return total


def conv_shape(ins: Instruction, lhs: list[Array], rhs: list[Array]) -> tuple[float, int, int, int, int]:
    """(FLOPs, batch, M, K, N) of an HLO convolution. XLA:TPU writes most dots as convolutions, batch
    dimensions as spatial ones whose window visits one input per output (size = outputs, lhs
    dilation); those count as independent matmuls, other spatial dimensions as rows (M) with their
    taps contracted (K)."""
    labels = ins.attr("dim_labels") or ""
    lhs_l, rest = labels.split("_", 1) if "_" in labels else ("", "")
    rhs_l, out_l = rest.split("->") if "->" in rest else ("", "")
    out = ins.outputs[0].dims
    spatial = sorted(c for c in lhs_l if c.isdigit())
    windows = _window(ins, len(spatial))
    kernel_i = rhs[0].dims[rhs_l.index("i")]
    kernel_o = rhs[0].dims[rhs_l.index("o")]
    out_b = out[out_l.index("b")]
    groups = max(int(ins.attr("feature_group_count") or 1), int(ins.attr("batch_group_count") or 1))
    batch, m, k = groups, out_b, kernel_i
    macs = out_b * kernel_o * kernel_i
    for d, w in zip(spatial, windows):
        size_in, size_out = lhs[0].dims[lhs_l.index(d)], out[out_l.index(d)]
        taps = _valid_taps(size_in, size_out, w)
        macs *= taps
        if w["size"] > 1 and w["size"] == size_out and taps == size_out:
            batch *= size_out  # one kernel slice per output position: a batch dimension
        else:
            m *= size_out
            k *= max(1, round(taps / max(size_out, 1)))
    return 2.0 * macs, batch, m, k, kernel_o // groups


def _users(instrs: list[Instruction]) -> dict[str, list[Instruction]]:
    users = defaultdict(list)
    for ins in instrs:
        for operand in ins.operands:
            users[operand].append(ins)
    return users


_VIEWS = {"bitcast", "reshape", "copy", "transpose"}


def _read_bytes(module: "Module", name: str, full: int, users: dict[str, list[Instruction]], depth: int = 0) -> int:
    """Bytes a fused computation reads of its parameter `name` (`full` bytes): a parameter used only
    through (dynamic-)slices reads the slices; the buffer a dynamic-update-slice updates in place is
    not read; views (bitcast) and nested fusions pass the question on; a parameter handed out
    unchanged by the root tuple (an async collective fusion carrying its buffers, aliased) is not
    read for that."""
    uses = users.get(name, [])
    if not uses or depth > 8:
        return full
    total = 0
    for use in uses:
        if use.opcode in ("dynamic-slice", "slice") and use.operands and use.operands[0] == name:
            total += sum(a.bytes for a in use.outputs)
        elif use.opcode == "dynamic-update-slice" and use.operands and use.operands[0] == name:
            continue
        elif use.opcode == "tuple" and use.root:
            continue
        elif use.opcode == "bitcast":
            total += _read_bytes(module, use.name, full, users, depth + 1)
        elif use.opcode == "fusion" and use.callees("calls"):
            called = use.callees("calls")[0]
            inner, inner_users = module.computations.get(called, []), module.users(called)
            for index, operand in enumerate(use.operands):
                param = next((i for i in inner if i.opcode == "parameter" and i.operand_text.strip() == str(index)), None)
                if operand == name and param is not None:
                    total += _read_bytes(module, param.name, full, inner_users, depth + 1)
        else:
            return full
    return min(total, full)


def _written_bytes(root: Instruction, by_name: dict[str, Instruction], outputs: list[Array]) -> int:
    """Bytes a fusion writes: its results, except that an in-place dynamic-update-slice writes its update,
    a parameter handed out unchanged writes nothing and a collective's result is the network's to
    write (collective_ops / perf count it)."""
    parts = [by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    total = 0
    for part, out in zip(parts, outputs):
        while part is not None and part.opcode == "bitcast" and part.operands:
            part = by_name.get(part.operands[0])
        if part is not None and (part.opcode == "parameter" or part.opcode in COLLECTIVES):
            continue
        if part is not None and part.opcode == "dynamic-update-slice" and len(part.operands) > 1:
            update = by_name.get(part.operands[1])
            total += sum(a.bytes for a in update.outputs) if update else out.bytes
        else:
            total += out.bytes if out.memory_space == 0 else 0
    return total


def _fusion_cost(module: Module, ins: Instruction, depth: int = 0) -> tuple[list[Dot], float, int]:
    """(dots, other FLOPs, HBM bytes) of one fusion: everything inside it, its parameters as read,
    its results as written."""
    dots, other = [], 0.0
    comp = (ins.callees("calls") or [""])[0]
    instrs = module.computations.get(comp, [])
    local = {i.name: i for i in instrs}
    for inner in instrs:
        d, o = _compute(module, inner, local)
        dots += d
        other += o
        if inner.opcode == "fusion" and depth < 8:
            d, o, _ = _fusion_cost(module, inner, depth + 1)
            dots += d
            other += o
    users = module.users(comp)
    params = {int(i.operand_text): i for i in instrs if i.opcode == "parameter" and i.operand_text.strip().isdigit()}
    read = 0
    for index, operand in enumerate(ins.operands):
        arrays_ = [a for a in module.shape(operand) if a.memory_space == 0]
        full = sum(a.bytes for a in arrays_)
        param = params.get(index)
        read += _read_bytes(module, param.name, full, users) if param is not None and full else full
    root = next((i for i in instrs if i.root), None)
    written = _written_bytes(root, local, ins.outputs) if root else sum(
        a.bytes for a in ins.outputs if a.memory_space == 0)
    return dots, other, read + written


def _compute(module: Module, ins: Instruction, local: dict[str, Instruction]) -> tuple[list[Dot], float]:
    """The dots and other FLOPs of one instruction (not descending into fusions)."""
    def shape(name):
        return local[name].outputs if name in local else module.shape(name)
    functions = module.functions.get(ins.stack_frame, ())
    gemm = ins.opcode == "custom-call" and re.search(r'custom_call_target="__cublas\$(lt\$)?(gemm|matmul)', ins.attrs)
    if (ins.opcode in ("dot", "convolution") or gemm) and len(ins.operands) >= 2:
        lhs, rhs = shape(ins.operands[0]), shape(ins.operands[1])
        if not lhs or not rhs:
            return [], 0.0
        if ins.opcode != "convolution":
            batch, m, k, n = dot_shape(ins, lhs, rhs)
            flops = 2.0 * batch * m * k * n
        else:
            flops, batch, m, k, n = conv_shape(ins, lhs, rhs)
        return [Dot(flops, batch, m, k, n, functions)], 0.0
    if ins.opcode in _ELEMENTWISE:
        return [], float(sum(a.elements for a in ins.outputs))
    if ins.opcode in _REDUCTIONS and ins.operands:
        return [], float(sum(a.elements for a in shape(ins.operands[0])))
    return [], 0.0


def _kernel(module: Module, ins: Instruction) -> dict | None:
    target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    if ins.opcode != "custom-call" or not target or target.group(1) != "tpu_custom_call":
        return None
    metadata = re.search(r'"xprof_metadata":"(\{.*?\})"', ins.attrs)
    return {"target": target.group(1), "op_name": ins.op_name,
            "operands": [{"dtype": a.dtype, "dims": list(a.dims)} for o in ins.operands for a in module.shape(o)[:1]],
            "metadata": metadata.group(1).replace('\\"', '"') if metadata else ""}


def ops(module: Module) -> list[Op]:
    """Every top-level instruction that computes or moves data, with its executions per step."""
    out = []
    for comp, instrs in module.computations.items():
        times = module.executions.get(comp, 0)
        if not times or comp in module.fused:
            continue
        local = {i.name: i for i in instrs}
        for ins in instrs:
            if ins.opcode in _FREE:
                continue
            if ins.opcode == "fusion":
                dots, other, hbm = _fusion_cost(module, ins)
            else:
                dots, other = _compute(module, ins, local)
                hbm = _plain_bytes(module, ins)
            out.append(Op(comp, ins.name, ins.opcode, times, hbm, dots, other,
                          module.functions.get(ins.stack_frame, ()), _kernel(module, ins)))
    return out


def _plain_bytes(module: Module, ins: Instruction) -> int:
    """HBM bytes of an unfused instruction: operands and results in device memory; a dynamic-slice
    reads its slice, a dynamic-update-slice writes its update in place, a copy-start reads its source."""
    if ins.opcode.endswith("-start") and ins.opcode != "copy-start" or ins.opcode in COLLECTIVES:
        return 0  # network transfers: collective_ops / perf count them
    outputs = [a for a in ins.outputs if a.memory_space == 0]
    operands = [a for o in ins.operands for a in module.shape(o) if a.memory_space == 0]
    if ins.opcode == "copy-start":
        return sum(a.bytes for a in operands) + sum(a.bytes for a in ins.outputs[:1] if a.memory_space == 0)
    if ins.opcode in ("dynamic-slice", "slice"):
        return 2 * sum(a.bytes for a in outputs)
    if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
        return 2 * sum(a.bytes for a in module.shape(ins.operands[1]))
    return sum(a.bytes for a in operands) + sum(a.bytes for a in outputs)


# ----------------------------------------------------------------------------------------------
# Collectives


@dataclasses.dataclass
class Collective:
    kind: str  # one of COLLECTIVES
    bytes: int  # per execution, on one device: the gathered result, the scattered shard, the reduced array
    times: int
    groups: list[list[int]] | None  # device groups (logical ids); None: a Megascale (cross-slice) transfer
    megascale: bool
    functions: tuple[tuple[str, str], ...]
    instruction: str = ""  # its name in the module (hlo.Module.by_name), for tracing what it moves


def collective_ops(module: Module, num_devices: int) -> list[Collective]:
    """Every collective of the step. XLA:TPU writes a reduce-scatter as a fusion around an all-reduce
    (`all-reduce-scatter`); it counts as a reduce-scatter. Across slices, XLA:TPU hands a collective
    to the Megascale runtime as a host-transfer `send` whose rendezvous names the collective.

    XLA:TPU's async collective fusion runs one collective as a chain of fusions (the start, then
    continuations fused with other work, then the done), each printing the collective with the same
    channel_id and chain_id: the chain counts once."""
    scatter_fusions = {name for name in module.computations if name.startswith("all-reduce-scatter")}
    chains: set[tuple[str, str]] = set()
    out = []
    for comp, instrs in module.computations.items():
        times = module.executions.get(comp, 0)
        if not times or comp in scatter_fusions:
            continue
        for ins in instrs:
            functions = module.functions.get(ins.stack_frame, ())
            if ins.opcode == "send" and "xla_megascale_runtime" in ins.attrs:
                rendezvous = re.search(r'_xla_host_transfer_rendezvous="([a-z\-]+)', ins.attrs)
                kind = rendezvous.group(1) if rendezvous and rendezvous.group(1) in COLLECTIVES else "all-reduce"
                first = next((a for a in ins.outputs if a.dims), None) or (ins.outputs[0] if ins.outputs else None)
                out.append(Collective(kind, first.bytes if first else 0, times, None, True, functions))
                continue
            called = ins.callees("calls")
            if ins.opcode == "fusion" and called and called[0] in scatter_fusions:
                inner = next((i for i in module.computations[called[0]] if i.opcode == "all-reduce"), ins)
                nbytes = sum(a.bytes for a in ins.outputs if a.dims)
                out.append(Collective("reduce-scatter", nbytes, times, groups(inner, num_devices), False, functions))
                continue
            kind = ins.opcode.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            chain = re.search(r'chain_id="(\d+)"', ins.attrs)
            if chain:
                key = (ins.attr("channel_id") or ins.name, chain.group(1))
                if key in chains:
                    continue
                chains.add(key)
            results = [a for a in ins.outputs if a.dims]  # scalars are the async ops' sync flags
            if ins.opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
                results = results[len(results) // 2:]  # (operands, results): count the results
            out.append(Collective(kind, sum(a.bytes for a in results), times, groups(ins, num_devices), False,
                                  functions, ins.name))
    return out


def groups(ins: Instruction, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (logical device ids), from any of XLA's printed forms."""
    line = ins.attrs
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=(\S+?\)|\[[\d,]*\]))?\s*\{([^}]*)\}", line)
    if mesh:
        sizes = [(n, int(s)) for n, s in re.findall(r"'([\w]+)'=(\d+)", mesh.group(1))]
        ids = _device_ids(mesh.group(2), num_devices).reshape([s for _, s in sizes])
        grouped = [i for i, (n, _) in enumerate(sizes) if f"'{n}'" in mesh.group(3)]
        rest = [i for i in range(len(sizes)) if i not in grouped]
        ids = ids.transpose(rest + grouped).reshape(-1, math.prod(sizes[i][1] for i in grouped) or 1)
        return ids.tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", line)
    if iota:
        return _device_ids(iota.group(3), num_devices).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    explicit = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line)
    if explicit:
        found = [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([\d, ]*)\}", explicit.group(1))]
        return [g for g in found if g] or [list(range(num_devices))]
    return [list(range(num_devices))]


def _device_ids(spec: str | None, num_devices: int):
    """`[a,b]T(1,0)` / `([a,b]T(1,0))` / `[8]` (an iota reshaped and transposed) or an explicit list."""
    if not spec:
        return np.arange(num_devices)
    if spec.startswith("("):
        spec = spec[1:-1]
    match = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not match:
        return np.arange(num_devices)
    dims = [int(d) for d in match.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(2):
        ids = ids.transpose([int(p) for p in match.group(2).split(",")])
    return ids.reshape(-1)
