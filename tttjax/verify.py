"""TTT parameter verification of a checkpoint.

    python -m tttjax.verify --checkpoint_dir DIR [--safetensors FILE]

DIR is a training step dir (`runs/x/checkpoints/checkpoint_000100`) or an imported checkpoint
(`config.json` + `params/`). The check:

1. the TTT layers of the checkpoint's config and their parameter counts (per layer and in total);
2. every expected TTT tensor (the `tttjax/weights/layout.py` rows of group "ttt") is stored in the
   checkpoint with its expected shape (read from the Orbax metadata, before loading anything);
3. the checkpoint loads (`load_model`) and every TTT tensor is finite;
4. the PyTorch export next to it (the step's `consolidated/lora.safetensors` or
   `consolidated.safetensors`, or `--safetensors FILE`) holds every TTT tensor, bit-for-bit equal
   to the loaded value cast to the file's dtype (its stored precision), and its config.json
   `ttt` block agrees;
5. a step dir's every array of `state/` (params and optimizer state) read back from disk matches,
   shard by shard, the digests its save recorded (`digests/`; a step saved before digests existed
   is noted, not failed).

Exit status 0 when everything holds; otherwise 1, with the list of what is missing or different.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from tttjax import cli, rundir
from tttjax.checkpoint import digests
from tttjax.errors import UserError
from tttjax.model.params import flat_abstract, flat_params, is_ttt
from tttjax.weights import layout
from tttjax.weights.loader import Weights, open_weights
from tttjax.weights.safetensors_io import load as load_safetensors
from tttjax.weights.sources import OrbaxSource, materialize


@dataclasses.dataclass
class Report:
    directory: str
    kind: str = ""  # "step" | "imported"
    ttt_layers: tuple[int, ...] = ()
    params_per_layer: dict[int, int] = dataclasses.field(default_factory=dict)
    tensors_per_layer: dict[int, int] = dataclasses.field(default_factory=dict)
    export: str | None = None
    missing: list[str] = dataclasses.field(default_factory=list)
    different: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    checked_tensors: int = 0
    checked_digests: int = 0  # shards of state/ that match their recorded digest

    @property
    def ok(self) -> bool:
        return bool(self.ttt_layers) and not (self.missing or self.different or self.unexpected or self.errors)

    def problems(self) -> list[str]:
        return ([f"missing: {m}" for m in self.missing] + [f"different: {d}" for d in self.different]
                + [f"unexpected: {u}" for u in self.unexpected] + [f"error: {e}" for e in self.errors])

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["ttt_layers"] = list(self.ttt_layers)
        out["total_ttt_params"] = sum(self.params_per_layer.values())
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        lines = [f"TTT verification of {self.directory} ({self.kind or 'unknown'} checkpoint)"]
        if self.params_per_layer:
            lines.append(f"{'temporal layer':>14s} {'TTT tensors':>12s} {'TTT params':>12s}")
            for layer in sorted(self.params_per_layer):
                lines.append(f"{layer:>14d} {self.tensors_per_layer[layer]:>12d} {self.params_per_layer[layer]:>12,d}")
            lines.append(f"{'total':>14s} {sum(self.tensors_per_layer.values()):>12d} "
                         f"{sum(self.params_per_layer.values()):>12,d}")
        if self.export:
            lines.append(f"compared with {self.export}: {self.checked_tensors} TTT tensors")
        if self.checked_digests:
            lines.append(f"digests: {self.checked_digests} shards of state/ read back and checked")
        lines += [f"note: {n}" for n in self.notes]
        problems = self.problems()
        if problems:
            lines.append(f"FAILED: {len(problems)} problem(s)")
            lines += [f"  {p}" for p in problems]
        elif self.ok:
            lines.append("OK: every TTT tensor is present, loads, and matches")
        return "\n".join(lines)


def _layer_of(name: str) -> int:
    return int(re.match(r"transformer\.layers\.(\d+)\.", name).group(1))


def stored_shapes(weights: Weights) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of what the checkpoint stores, from Orbax metadata only."""
    if weights.kind == rundir.STEP:
        source = OrbaxSource(weights.path / rundir.STATE, prefix=("params",))
    else:
        source = OrbaxSource(weights.path / rundir.PARAMS_DIR)
    return {p: shape for p, (shape, _) in source.specs.items()}


def _compare(name: str, expected: np.ndarray, stored: np.ndarray, report: Report) -> None:
    if tuple(stored.shape) != tuple(expected.shape):
        report.different.append(f"{name}: shape {tuple(stored.shape)} in the export vs {tuple(expected.shape)}")
        return
    want = expected.astype(stored.dtype)
    a = np.ascontiguousarray(want).view(f"u{want.dtype.itemsize}")
    b = np.ascontiguousarray(stored).view(f"u{stored.dtype.itemsize}")
    if not np.array_equal(a, b):
        diff = np.abs(want.astype(np.float64) - stored.astype(np.float64))
        count = int(np.count_nonzero(a != b))
        report.different.append(f"{name}: {count} of {a.size} values differ at the file's precision "
                                f"({stored.dtype}), max abs diff {float(np.nanmax(diff)):.3g}")


def verify(directory: str | Path, *, model=None, safetensors: str | Path | None = None) -> Report:
    """Runs the checks above; `model` skips loading (the eval CLI passes the model it loaded)."""
    directory = Path(directory)
    report = Report(str(directory))
    try:
        weights = open_weights(directory)
        if weights.kind == rundir.PYTORCH:
            raise UserError(f"{directory}: verify checks a tttjax checkpoint (a step dir or a model dir)")
    except (FileNotFoundError, ValueError) as e:
        report.errors.append(str(e))
        return report
    cfg, report.kind = weights.cfg, "step" if weights.kind == rundir.STEP else "imported"
    report.ttt_layers = tuple(cfg.ttt_layers)
    if not cfg.ttt_layers:
        report.errors.append("the checkpoint's config has no TTT layers (ttt.enable false / no 'ttt' block in "
                             "config.json): nothing to verify")
        return report

    # 1. the expected tensors, their counts.
    abstract = {p: tuple(v.shape) for p, v in flat_abstract(cfg).items()}
    rows = [r for r in layout.rows(cfg) if r.group == "ttt"]
    for r in rows:
        layer = _layer_of(r.name)
        report.tensors_per_layer[layer] = report.tensors_per_layer.get(layer, 0) + 1
        report.params_per_layer[layer] = (report.params_per_layer.get(layer, 0)
                                          + math.prod(r.torch_shape(abstract[r.path])))

    # 2. stored in the checkpoint (metadata).
    try:
        stored = stored_shapes(weights)
    except Exception as e:  # Orbax raises many types for a damaged directory
        report.errors.append(f"cannot read the checkpoint's metadata ({type(e).__name__}: {e})")
        return report
    ttt_paths = sorted({r.path for r in rows})
    for path in ttt_paths:
        names = [r.name for r in rows if r.path == path]
        if path not in stored:
            report.missing += [f"{n} (checkpoint param {'.'.join(path)})" for n in names]
        elif stored[path] != abstract[path]:
            report.different.append(f"checkpoint param {'.'.join(path)}: shape {stored[path]} vs expected "
                                    f"{abstract[path]} (ttt layers {list(cfg.ttt_layers)})")
    extra = sorted(".".join(p) for p in stored if is_ttt(p) and p not in set(ttt_paths))
    report.unexpected += [f"checkpoint param {p}" for p in extra]
    if report.missing or report.different:
        return report

    # 3. load, finite.
    if model is None:
        try:
            model = materialize(cfg, weights.source, source_name=str(directory))
        except Exception as e:  # a corrupt checkpoint can fail anywhere in Orbax / tensorstore
            report.errors.append(f"loading failed ({type(e).__name__}: {e})")
            return report
    flat = flat_params(model)
    values = {}
    for r in rows:
        param = np.asarray(flat[r.path], np.float32)
        value = r.to_torch(lambda idx: param[idx])
        values[r.name] = value
        if not np.all(np.isfinite(value)):
            report.different.append(f"{r.name}: {int(np.sum(~np.isfinite(value)))} non-finite values")

    _check_export(report, directory, safetensors, cfg, rows, values)
    if report.kind == "step":
        _check_digests(report, directory)
    return report


def _check_digests(report: Report, step: Path) -> None:
    """5. Every recorded shard of the step's state/, read from disk, against its digest."""
    if not (step / rundir.DIGESTS).is_dir():
        report.notes.append(f"{step.name} has no {rundir.DIGESTS}/ (saved before digests existed): not checked")
        return
    try:
        recorded = digests.DigestsHandler().restore(step / rundir.DIGESTS)
        source = OrbaxSource(step / rundir.STATE)
    except (ValueError, OSError, KeyError) as e:
        report.errors.append(f"cannot read the digests or the state of {step} ({e})")
        return
    stored = {"/".join(path): path for path in source.specs}
    for name, entry in sorted(recorded.items()):
        if name not in stored:
            report.missing.append(f"state array {name} (recorded in {rundir.DIGESTS}/, not in {rundir.STATE}/)")
            continue
        for index, digest in sorted({json.dumps(s["index"]): s["digest"] for s in entry["shards"]}.items()):
            bounds = json.loads(index)
            try:
                block = source.read(stored[name], tuple(slice(a, b) for a, b in bounds))
            except UserError as e:
                report.errors.append(str(e))
                continue
            got = digests.host_digest(block, [a for a, _ in bounds], entry["shape"])
            if digests.hex_digest(got) != digest:
                where = ", ".join(f"{a}:{b}" for a, b in bounds)
                report.different.append(f"state array {name} shard [{where}]: its stored values do not match the "
                                        f"digest recorded when it was saved")
            else:
                report.checked_digests += 1


def _check_export(report: Report, directory: Path, safetensors, cfg, rows, values: dict) -> None:
    """4. The TTT tensors of the step's consolidated/ export (or --safetensors) against the checkpoint's
    values, and its config.json's "ttt" block against the checkpoint's."""
    export = Path(safetensors) if safetensors else rundir.find_export(directory)
    if export is None:
        if report.kind == "step":
            report.missing.append(f"{directory / rundir.CONSOLIDATED}: no {' or '.join(rundir.EXPORT_FILES)}")
        else:
            report.notes.append("imported checkpoint without an export to compare; pass --safetensors FILE "
                                "(e.g. the lora.safetensors it was imported from) to compare values")
        return
    report.export = str(export)
    try:
        tensors = load_safetensors(export)
    except (FileNotFoundError, ValueError) as e:
        report.errors.append(str(e))
        return
    for r in rows:
        if r.name not in tensors:
            report.missing.append(f"{r.name} (not in {export.name})")
            continue
        _compare(r.name, values[r.name], tensors[r.name], report)
        report.checked_tensors += 1
    expected_names = {r.name for r in rows}
    report.unexpected += [f"{k} (in {export.name}, not a TTT tensor of this config)" for k in sorted(tensors)
                          if "seq_modeling_block" in k and k not in expected_names]
    config_json = export.parent / rundir.CONFIG_FILE
    if config_json.is_file() and not safetensors:
        try:
            saved = rundir.read_json(config_json).get("ttt") or {}
        except ValueError as e:
            report.errors.append(str(e))
            return
        want = cfg.ttt_dict()
        for key in sorted(set(saved) | set(want)):
            if key in ("scan_remat_group",):
                continue
            if saved.get(key) != want.get(key):
                report.different.append(f"{config_json} ttt.{key}: {saved.get(key)!r} vs checkpoint "
                                        f"{want.get(key)!r}")


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.verify", description=__doc__.split("\n")[0],
                                     epilog="Exit status 1 lists every missing or different TTT tensor.")
    cli.add_checkpoint_dir(parser)
    parser.add_argument("--safetensors", default=None,
                        help="compare with this PyTorch file instead of the step's consolidated/ export")
    cli.add_output_json(parser, help="write the report as JSON")
    args = parser.parse_args(argv)
    if args.output_json:
        rundir.check_output_file(args.output_json, "--output_json")
    report = verify(args.checkpoint_dir, safetensors=args.safetensors)
    print(report.format())
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
