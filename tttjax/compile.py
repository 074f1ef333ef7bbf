"""Compile a run's train step for a TPU topology on any host, and say whether it fits:
`python -m tttjax.compile --config=configs/moshi_7b_ttt.py --topology=v5p-64 [--num_slices=2] ...`.

The step is the trainer's own (`build_program`: the same mesh, shardings, donation, microbatching,
remat and dtypes), lowered for abstract parameters over the topology's abstract devices (libtpu's
compiler, `jax.experimental.topologies`; nothing is allocated), as MaxText's train_compile does.
It reports the compiler's per-device memory against the chip's HBM, the analytic estimate beside
it, FLOPs and the collectives of one step, and the predicted step time, MFU and frames/s per chip
(analysis/perf.py, from the optimized HLO; docs/distributed.md). A run that does not fit exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

from tttjax import cli, layout_search, rundir
from tttjax.analysis import fit, gathers, memory, perf, topology
from tttjax.analysis.flops import train_step_flops
from tttjax.analysis.memory import format_bytes
from tttjax.config import reader
from tttjax.data.streams import FRAME_RATE, num_frames
from tttjax.errors import UserError
from tttjax.eval.standard import Evaluator
from tttjax.model.attention import resolve_impl
from tttjax.parallel.sharding import batch_parallelism
from tttjax.train import executable
from tttjax.train.program import build_program

USAGE = ("usage: python -m tttjax.compile --config=configs/x.py --topology=v5p-64 [--num_slices=N] "
         "[--config.a.b=v ...] [--output_json F] [--dump_hlo DIR] [--save_executable DIR] [--no_eval] "
         "[--find_max_duration [--per_device_batch N]] [--search [--search_budget N]] [--search_layers N]")


class CompileError(UserError):
    """The step cannot be compiled for the topology (not an out-of-memory refusal)."""


def _progress(message: str) -> None:
    print(f"[compile] {message}", file=sys.stderr, flush=True)


def _compile(lowered, what: str):
    """(compiled, None), or (None, Refusal) where XLA:TPU refuses the program for its HBM."""
    try:
        return fit.compile_program(lowered.compile)
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"compiling the {what} failed: {first}") from None


def _fit(figures: dict | None, refused, hbm: int) -> dict:
    """`fits` and `headroom_bytes` from the compiler's figures (or its refusal)."""
    need = figures["total_bytes"] if figures else refused.need
    return {"fits": figures is not None and fit.verdict(need, hbm) != "does not fit", "headroom_bytes": hbm - need}


def compile_run(config, topo: topology.Topology, *, with_eval: bool = True, dump_hlo: Path | None = None,
                save_executable: Path | None = None, log=_progress) -> dict:
    """Compile `config`'s train step (and eval step) for `topo`; the report `--output_json` writes.
    `save_executable`: write the compiled train step there for a run's `compiled_step`."""
    devices = topo.devices()
    program = build_program(config, devices)
    cfg, mesh = program.cfg, dict(program.mesh.shape)
    frames = program.batch.shape[2]
    hbm = topo.hbm_per_device(len(devices))
    log(f"{topo.name}: {len(devices)} devices ({devices[0].device_kind}), mesh {mesh}, "
        f"batch {config.batch_size} x {frames} frames; lowering the train step")
    tic = time.perf_counter()
    try:
        lowered = program.lower()
    except RuntimeError as e:  # JAX's cuDNN attention reads the cuDNN version while tracing
        if "cuDNN" not in str(e):
            raise
        raise CompileError(f"{e} (cuDNN attention traces only with libcudnn installed, pip install "
                           f"nvidia-cudnn-cu12; or --config.model.attention_impl=blockwise)") from None
    log(f"lowered in {time.perf_counter() - tic:.0f} s; compiling (a 7B step takes minutes)")
    with executable.fresh_compile() if save_executable is not None else contextlib.nullcontext():
        compiled, refused = _compile(lowered, "train step")
    compile_s = time.perf_counter() - tic
    log(f"compiled in {compile_s:.0f} s" if compiled else f"the compiler refused it for HBM after {compile_s:.0f} s")
    figures = memory.compiled_figures(compiled) if compiled else None
    estimate = _train_estimate(program, config.batch_size, frames, config.num_microbatches)
    text = compiled.as_text() if compiled else ""
    model_flops = train_step_flops(cfg, config.batch_size, frames, full_finetuning=program.full_finetuning)
    report = {
        "topology": topo.name, "shape": f"{topo.generation}:{topo.shape}", "num_slices": topo.num_slices,
        "num_devices": len(devices), "device_kind": devices[0].device_kind, "mesh": mesh,
        "batch_size": int(config.batch_size), "duration_sec": float(config.duration_sec), "num_frames": frames,
        "remat": cfg.remat, "full_finetuning": program.full_finetuning, "frozen_weights": config.frozen_weights,
        "windowed_einsum": bool(config.windowed_einsum), "num_microbatches": int(config.num_microbatches),
        "attention_window": cfg.context,
        "attention_impl": resolve_impl(cfg.attention_impl, topo.platform, frames, cfg.jnp_dtype),
        "per_device": figures, "hbm_bytes": hbm, "hbm_source": f"{topo.chip.name} in analysis/chips.py: {topo.chip.source}",
        **_fit(figures, refused, hbm),
        "compiler_refused": None if compiled else {"needed_bytes": refused.need, "available_bytes": refused.available},
        "estimate_bytes": estimate.total, "estimate": dataclasses.asdict(estimate),
        "model_flops_per_step": model_flops,
        "compiler_flops_per_device": topology.compiler_flops(compiled) if compiled else None,
        "collectives": topology.collectives(text, program.mesh) if compiled else None,
        "performance": perf.predict(text, program.mesh, topo.chip, model_flops=model_flops,
                                    frames_per_step=config.batch_size * frames, slice_shape=topo.dims,
                                    num_slices=topo.num_slices, attention_window=cfg.context) if compiled else None,
        "weight_gathers": gathers.weight_gathers(text, cfg, mesh, full_finetuning=program.full_finetuning,
                                                 num_microbatches=config.num_microbatches,
                                                 frozen_weights=config.frozen_weights) if compiled else None,
        "compile_s": compile_s, "eval": None,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "mesh_config": config.mesh.to_dict(),
    }
    if dump_hlo is not None and compiled:
        (dump_hlo / "train_step.hlo.txt").write_text(text)
    if save_executable is not None and compiled:
        executable.save(save_executable, program, lowered, compiled)
        log(f"wrote the compiled train step to {save_executable} (run it with --config.compiled_step={save_executable})")
    if with_eval and report["fits"]:
        report["eval"] = _compile_eval(config, program, hbm, dump_hlo, log)
        report["fits"] = report["eval"]["fits"]
    return report


def _train_estimate(program, batch_size: int, frames: int, num_microbatches: int):
    """The analytic estimate of `program`'s train step on TPU (where attention `auto` is splash)."""
    return memory.estimate_memory(program.cfg, batch_size=batch_size, num_frames=frames,
                                  num_microbatches=num_microbatches, full_finetuning=program.full_finetuning,
                                  mesh_axes=dict(program.mesh.shape), platform=program.mesh.devices.flat[0].platform,
                                  frozen_weights=program.config.frozen_weights)


def _compile_eval(config, program, hbm: int, dump_hlo: Path | None, log) -> dict:
    """The trainer's evaluation forward (the same `Evaluator`) at batch_size on the program's mesh."""
    evaluator = Evaluator(text_padding_weight=config.text_padding_weight,
                          first_codebook_weight_multiplier=config.first_codebook_weight_multiplier, mesh=program.mesh)
    log("compiling the eval step")
    tic = time.perf_counter()
    compiled, refused = _compile(evaluator.lower(program.eval_model(), program.batch.shape), "eval step")
    figures = memory.compiled_figures(compiled) if compiled else None
    if dump_hlo is not None and compiled:
        (dump_hlo / "eval_step.hlo.txt").write_text(compiled.as_text())
    estimate = memory.estimate_memory(program.cfg, batch_size=config.batch_size, num_frames=program.batch.shape[2],
                                      mesh_axes=dict(program.mesh.shape), training=False,
                                      platform=program.mesh.devices.flat[0].platform,
                                      frozen_weights=config.frozen_weights)
    return {"per_device": figures, **_fit(figures, refused, hbm), "estimate_bytes": estimate.total,
            "compile_s": time.perf_counter() - tic}


def not_fit_message(report: dict) -> str:
    """One line: the topology, the figures and the biggest contributors."""
    hbm, step = report["hbm_bytes"], report
    if report["fits"] is False and report["eval"] is not None:
        step, what = report["eval"], "the eval step"
    else:
        what = "the train step"
    if step["per_device"]:
        m = step["per_device"]
        figures = (f"{format_bytes(m['total_bytes'])} of {format_bytes(hbm)} per device (temporaries {format_bytes(m['temp_bytes'])}, "
                   f"arguments {format_bytes(m['argument_bytes'])}, outputs {format_bytes(m['output_bytes'] - m['alias_bytes'])} "
                   f"not aliased)")
    else:
        need, have = report["compiler_refused"]["needed_bytes"], report["compiler_refused"]["available_bytes"]
        figures = (f"the compiler needs {format_bytes(need)} of temporaries per device, where {format_bytes(have)} of the "
                   f"{format_bytes(hbm)} HBM is usable")
    parts = sorted(((v, k) for k, v in report["estimate"].items() if k != "margin"), reverse=True)[:2]
    biggest = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for v, k in parts)
    return (f"{report['topology']}: {what} does not fit: {figures}; biggest in the estimate: {biggest}; "
            f"{fit.train_advice(report['remat'], report['mesh'], topology=True)}")


def format_report(report: dict) -> str:
    lines = [f"topology     {report['topology']} ({report['shape']}, {report['num_devices']} devices, "
             f"{report['device_kind']})",
             f"mesh         {' '.join(f'{k}={v}' for k, v in report['mesh'].items())}",
             f"step         batch {report['batch_size']} x {report['num_frames']} frames "
             f"({report['duration_sec']:g} s), remat={report['remat']}, attention={report['attention_impl']}, "
             f"{'full fine-tuning' if report['full_finetuning'] else 'adapters'}, frozen weights "
             f"{report['frozen_weights']}{'' if report['windowed_einsum'] else ', windowed einsums off'}; "
             f"compile {report['compile_s']:.0f} s"]
    if report.get("extrapolated_from_plain_layers"):
        small, large = report["extrapolated_from_plain_layers"]
        lines.append(f"extrapolated every figure below linearly from compiles with {small} and {large} plain temporal "
                     f"layers (the TTT layers kept)")
    hbm = report["hbm_bytes"]
    m = report["per_device"]
    if m:
        lines.append(f"per device   arguments {format_bytes(m['argument_bytes'])}, outputs {format_bytes(m['output_bytes'])} "
                     f"(aliased {format_bytes(m['alias_bytes'])}), temporaries {format_bytes(m['temp_bytes'])}, "
                     f"code {format_bytes(m['generated_code_bytes'])}")
        lines.append(f"             total {format_bytes(m['total_bytes'])} of {format_bytes(hbm)} HBM ({report['hbm_source'].split(':')[0]}): "
                     f"headroom {format_bytes(report['headroom_bytes'])} ({report['headroom_bytes'] / hbm:.0%})")
        lines.append(f"estimate     {format_bytes(report['estimate_bytes'])} "
                     f"({report['estimate_bytes'] / max(m['total_bytes'], 1):.2f} x the compiler's total)")
    else:
        r = report["compiler_refused"]
        lines.append(f"per device   refused by the compiler: {format_bytes(r['needed_bytes'])} of temporaries, "
                     f"{format_bytes(r['available_bytes'])} usable ({format_bytes(hbm)} HBM, {report['hbm_source'].split(':')[0]})")
        lines.append(f"estimate     {format_bytes(report['estimate_bytes'])}")
    if report["compiler_flops_per_device"] is not None:
        per_device = report["model_flops_per_step"] / report["num_devices"]
        lines.append(f"flops        model {report['model_flops_per_step']:.3e} per step ({per_device:.3e} per device); "
                     f"compiler {report['compiler_flops_per_device']:.3e} per device")
    if report.get("performance"):
        lines += perf.format_performance(report["performance"])
    if report.get("weight_gathers"):
        lines.append(gathers.format_weight_gathers(report["weight_gathers"]))
    for kind, c in (report["collectives"] or {}).items():
        if c["count"]:
            axes = ", ".join(f"{a} {v['count']}x {format_bytes(v['bytes'])}" for a, v in c["by_axes"].items())
            dcn = f"; DCN {c['dcn_count']}x {format_bytes(c['dcn_bytes'])}" if c["dcn_count"] else ""
            lines.append(f"{kind:<19} {c['count']:>6}x {format_bytes(c['bytes']):>12}  over {axes}{dcn}")
    if report["eval"]:
        e = report["eval"]
        total = format_bytes(e["per_device"]["total_bytes"]) if e["per_device"] else "refused by the compiler"
        lines.append(f"eval step    {total} per device, estimate {format_bytes(e['estimate_bytes'])}, "
                     f"compile {e['compile_s']:.0f} s")
    tight = report["fits"] and report["headroom_bytes"] < (1 - fit.MARGIN) * hbm
    lines.append(("fits, within {:.0%} of HBM".format(1 - fit.MARGIN) if tight else "fits") if report["fits"]
                 else "DOES NOT FIT")
    return "\n".join(lines)


def longest_fit(fits, *, start: int, growth: float = 2.0) -> int:
    """The largest frame count n with fits(n) (0 if none), for a monotone `fits`: growing (by
    `growth`) or halving from `start`, then bisection to within 2% (or one second) of the answer."""
    if fits(start):
        lo, hi = start, max(start + 1, int(start * growth))
        while fits(hi):
            lo, hi = hi, max(hi + 1, int(hi * growth))
    else:
        lo, hi = 0, start
        while hi > 1 and not fits(hi // 2):
            hi //= 2
        lo = hi // 2 if hi > 1 else 0
    while hi - lo > max(FRAME_RATE, 0.02 * lo):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def find_max_duration(config, topo: topology.Topology, *, per_device_batch: int = 1, log=_progress) -> dict:
    """The longest duration_sec whose train step fits at `per_device_batch` sequences per batch shard.

    The search starts where the analytic estimate's fit ends (no compile; it runs 1.0-1.35x the
    compiler, BENCHMARKS.md) and grows by 10% from there: each probe is one compile.
    """
    probe = config.copy_and_resolve_references()
    program = build_program(probe, topo.devices())
    probe.batch_size = per_device_batch * batch_parallelism(program.mesh)
    hbm = topo.hbm_per_device(len(topo.devices()))

    def estimate_fits(frames: int) -> bool:
        return _train_estimate(program, probe.batch_size, frames, probe.num_microbatches).total <= hbm

    estimated = longest_fit(estimate_fits, start=num_frames(config.duration_sec))
    log(f"the analytic estimate fits up to {estimated} frames ({estimated / FRAME_RATE:g} s)")
    probes: dict[int, bool] = {}

    def fits(frames: int) -> bool:
        probe.duration_sec = frames / FRAME_RATE
        log(f"probe: {frames} frames ({probe.duration_sec:g} s) at batch {probe.batch_size}")
        probes[frames] = compile_run(probe, topo, with_eval=False, log=lambda _: None)["fits"]
        log(f"  {'fits' if probes[frames] else 'does not fit'}")
        return probes[frames]

    frames = longest_fit(fits, start=estimated or num_frames(config.duration_sec), growth=1.1)
    return {"max_duration_sec": frames / FRAME_RATE, "max_frames": frames, "batch_size": probe.batch_size,
            "per_device_batch": per_device_batch, "estimate_max_frames": estimated,
            "probes": {str(k): v for k, v in sorted(probes.items())}}


def parse_args(argv: list[str]):
    spec, overrides, rest = reader.split_config_args(argv)
    parser = argparse.ArgumentParser(prog="python -m tttjax.compile", usage=USAGE, description=__doc__.split("\n")[0])
    parser.add_argument("--topology", required=True, help=f"{topology.FORMS}")
    parser.add_argument("--num_slices", type=int, default=1, help="TPU slices joined over DCN (default 1)")
    cli.add_output_json(parser, help="write the report here (keys in docs/distributed.md)")
    parser.add_argument("--dump_hlo", help="write the optimized HLO of each step into this directory")
    parser.add_argument("--no_eval", action="store_true", help="compile the train step only")
    parser.add_argument("--save_executable", help="write the compiled train step into this directory, for a run's "
                        "--config.compiled_step (on the topology it was compiled for)")
    parser.add_argument("--find_max_duration", action="store_true",
                        help="bisect duration_sec for the longest train step that fits")
    parser.add_argument("--per_device_batch", type=int, default=1,
                        help="with --find_max_duration: sequences per batch shard (default 1)")
    parser.add_argument("--search", action="store_true",
                        help="compile candidate layouts (mesh, remat, microbatches, frozen_weights) and rank them")
    parser.add_argument("--search_budget", type=int, default=6, help="with --search: layouts to compile (default 6)")
    parser.add_argument("--search_layers", type=int, default=0,
                        help="compile N and N-1 plain temporal layers and extrapolate to the full model (each "
                        "--search candidate, or the config's own layout; 0: compile the full model)")
    args = parser.parse_args(rest)
    if args.search_budget < 1 or args.search_layers < 0 or args.search_layers in (1, 2):
        parser.error("--search_budget must be >= 1 and --search_layers 0 or >= 3")
    if args.search_layers and (args.find_max_duration or args.dump_hlo or args.save_executable):
        parser.error("--search_layers predicts from cut programs: not with --find_max_duration, --dump_hlo "
                     "or --save_executable")
    if spec is None:
        parser.error("--config is required")
    return spec, overrides, args


def _main(argv: list[str]) -> int:
    spec, overrides, args = parse_args(argv)
    config = reader.load(spec, overrides)
    topo = topology.topology(args.topology, args.num_slices)
    output = Path(args.output_json).absolute() if args.output_json else None
    if output is not None:
        rundir.check_output_file(output, "--output_json")
    dump_hlo = Path(args.dump_hlo).absolute() if args.dump_hlo else None
    if dump_hlo is not None:
        rundir.check_output_dir(dump_hlo, "--dump_hlo")
    save_executable = Path(args.save_executable).absolute() if args.save_executable else None
    if save_executable is not None:
        rundir.check_output_dir(save_executable, "--save_executable")
    try:
        if args.search:
            report = layout_search.search(
                config, topo, lambda c, t: compile_run(c, t, with_eval=False, log=lambda _: None),
                budget=args.search_budget, layers=args.search_layers or None, log=_progress)
            print(layout_search.format_search(report))
            report = layout_search.as_json(report)
        elif args.find_max_duration:
            report = find_max_duration(config, topo, per_device_batch=args.per_device_batch)
            report["topology"] = topo.name
            print(f"{topo.name}: longest train step that fits at batch {report['batch_size']} "
                  f"({args.per_device_batch} per batch shard): {report['max_duration_sec']:g} s = "
                  f"{report['max_frames']} frames")
        elif args.search_layers:
            report = layout_search.compile_cut(
                config, topo, lambda c, t: compile_run(c, t, with_eval=False, log=_progress), args.search_layers)
            print(format_report(report))
        else:
            report = compile_run(config, topo, with_eval=not args.no_eval, dump_hlo=dump_hlo,
                                 save_executable=save_executable)
            print(format_report(report))
    except UserError as e:  # CompileError, and a config the program refuses (mesh, batch)
        raise type(e)(f"{topo.name}: {e}") from None
    report["command"] = " ".join(["python -m tttjax.compile", *argv])
    if output is not None:
        output.write_text(json.dumps(report, indent=1) + "\n")
    if args.search:
        return 0 if report["best"] else 1
    if not args.find_max_duration and not report["fits"]:
        raise CompileError(not_fit_message(report))
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv, for_tpu_compile=True)


if __name__ == "__main__":
    sys.exit(main())
