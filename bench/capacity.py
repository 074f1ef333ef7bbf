"""The capacity and speed tables of docs/distributed.md and BENCHMARKS.md from `tttjax.compile` reports.

    python -m tttjax.compile --config=configs/moshi_7b_ttt.py --topology=v5p-8 --output_json r1.json [--dump_hlo d1]
    ...
    python bench/capacity.py r1.json r2.json ...            # the capacity table
    python bench/capacity.py --speed r1.json r2.json ...    # the speed table (predicted)
    python bench/capacity.py --speed r1.json ... --hlo d1 ...  # re-predict from the dumped HLO (reports first)

Capacity: one markdown row per report: what trains, topology and mesh, batch x duration, the
temporal attention (reports written before attention_impl existed compiled full scores: xla), fits,
the compiler's per-device total against HBM (headroom), the estimate and its ratio, the collectives
of one step (count and GiB by kind, DCN share) and compile seconds.

Speed: the report's `performance` (tttjax/analysis/perf.py: predicted from the compiled program,
never measured): step time with everything overlapped / op by op / nothing overlapped, MFU and
frames/s per chip for those, what bounds it, the TTT inner scan's share, the weight gathers
against their analytic minimum (recomputed by the current gathers.py from the report's command),
the layout (the run's mesh; `--search` ranks layouts), the date and
command of the compile. With `--hlo`, each report whose `--dump_hlo` directory is given (matched by
position) is predicted again by the current perf.py and gathers.py from its train_step.hlo.txt
(needs libtpu for the topology's devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

GiB = 1024 ** 3
KINDS = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "CP"}


def _trains(report: dict) -> str:
    return "full fine-tuning" if report["full_finetuning"] else "LoRA 128 + TTT 1,5,10"


def _mesh(report: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1) or "1 device"


def row(report: dict) -> str:
    hbm = report["hbm_bytes"] / GiB
    if report["per_device"]:
        total = report["per_device"]["total_bytes"] / GiB
        memory = f"{total:.2f} of {hbm:.0f} GiB ({report['headroom_bytes'] / report['hbm_bytes']:.0%} free)"
        ratio = f"{report['estimate_bytes'] / report['per_device']['total_bytes']:.2f}x"
    else:
        memory = f"refused: needs {report['compiler_refused']['needed_bytes'] / GiB:.1f} GiB temporaries of {hbm:.0f}"
        ratio = "-"
    collectives = ", ".join(
        f"{KINDS[k]} {c['count']}x {c['bytes'] / GiB:.2f}" + (f" (DCN {c['dcn_count']}x)" if c["dcn_count"] else "")
        for k, c in (report["collectives"] or {}).items() if c["count"]) or "-"
    return (f"| {_trains(report)} | {report['topology']} | {_mesh(report)} | {report['batch_size']} x {report['duration_sec']:g} s | "
            f"{report.get('attention_impl', 'xla')} | {'yes' if report['fits'] else 'NO'} | {memory} | {report['estimate_bytes'] / GiB:.2f} GiB ({ratio}) | "
            f"{collectives} | {report['compile_s']:.0f} |")


SPEED_HEADER = ("| recipe | topology | layout | batch | fits | HBM per device | "
                "step s: overlap / op by op / serial | MFU: overlap / op by op / serial | frames/s per chip: overlap / op by op | "
                "bound | TTT inner scan | weight gathers / minimum (GiB) | date | command |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _command(command: str) -> str:
    """The compile command without where it wrote its files (--output_json, --dump_hlo)."""
    return re.sub(r" --(output_json|dump_hlo)[= ]\S+", "", command)


def speed_row(report: dict) -> str:
    recipe = f"{_trains(report)}, {report['duration_sec']:g} s"
    command = f"`{_command(report['command'])}`" if report.get("command") else "-"
    layout = (_mesh(report) + f", remat={report['remat']}"
              + ("" if report.get("windowed_einsum", True) else ", windowed einsums off"))
    head = (f"| {recipe} | {report['topology']} | {layout} | {report['batch_size']} x {report['duration_sec']:g} s | "
            f"{'yes' if report['fits'] else 'NO'} | ")
    p = report.get("performance")
    if not report["per_device"] or p is None:
        need = report["compiler_refused"]["needed_bytes"] / GiB if report.get("compiler_refused") else 0
        return head + (f"refused: {need:.1f} GiB of temporaries | - | - | - | - | - | - | {report.get('date', '-')} | "
                       f"{command} |")
    s, mfu, fps = p["step_s"], p["mfu"], p["frames_per_s_per_chip"]
    ttt = p["parts"].get("ttt_inner_scan", {}).get("share", 0.0)
    hbm = f"{report['per_device']['total_bytes'] / GiB:.2f} of {report['hbm_bytes'] / GiB:.0f} GiB"
    w = report.get("weight_gathers") or {}
    gathers = (f"{w['compiled_bytes'] / GiB:.2f} / {w['minimum_bytes'] / GiB:.2f} ({w['ratio']:.2f}x)"
               if w.get("ratio") else "-")
    return head + (f"{hbm} | {s['overlap']:.3f} / {s['roofline']:.3f} / {s['serial']:.3f} | "
                   f"{mfu['overlap']:.1%} / {mfu['roofline']:.1%} / {mfu['serial']:.1%} | "
                   f"{fps['overlap']:.0f} / {fps['roofline']:.0f} | {p['bound']} | {ttt:.0%} | {gathers} | "
                   f"{report.get('date', '-')}, predicted | {command} |")


def _run_config(report: dict):
    from tttjax.config import reader

    spec, overrides, _ = reader.split_config_args(report["command"].split()[3:])  # after "python -m tttjax.compile"
    return reader.load(spec, overrides)


def reminimum(report: dict) -> dict:
    """The report's weight-gather minimum again by the current gathers.py (the config from the
    report's command; the compiled bytes stay the report's)."""
    from tttjax.analysis import gathers
    from tttjax.model.config import from_run_config
    from tttjax.model.params import flat_abstract, trainable

    cfg = dataclasses.replace(from_run_config(_run_config(report)), remat=report["remat"])  # what it compiled
    full = report["full_finetuning"]
    minimum = gathers.minimum_gathers(cfg, report["mesh"], full_finetuning=full,
                                      num_microbatches=report["num_microbatches"],
                                      frozen_weights=report["frozen_weights"])
    trains = {".".join(p) for p in flat_abstract(cfg) if trainable(p, full)}
    w = report["weight_gathers"]
    w["minimum_bytes"] = sum(minimum.values())
    w["trainable"]["minimum_bytes"] = sum(v for k, v in minimum.items() if k in trains)
    w["frozen"]["minimum_bytes"] = w["minimum_bytes"] - w["trainable"]["minimum_bytes"]
    w["ratio"] = w["compiled_bytes"] / w["minimum_bytes"] if w["minimum_bytes"] else None
    return report


def repredict(report: dict, hlo_dir: Path) -> dict:
    """The report's `performance` and `weight_gathers` again by the current perf.py and gathers.py
    from the dumped HLO (the config from the report's command)."""
    from tttjax.analysis import gathers, perf, topology
    from tttjax.model.config import from_run_config
    from tttjax.parallel.mesh import make_mesh

    topo = topology.topology(report["shape"], report["num_slices"])
    mesh = make_mesh(report["mesh_config"], topo.devices())
    text = (hlo_dir / "train_step.hlo.txt").read_text()
    report["performance"] = perf.predict(text, mesh, topo.chip, model_flops=report["model_flops_per_step"],
                                         frames_per_step=report["batch_size"] * report["num_frames"],
                                         slice_shape=topo.dims, num_slices=topo.num_slices,
                                         attention_window=report["attention_window"])
    report["weight_gathers"] = gathers.weight_gathers(
        text, from_run_config(_run_config(report)), report["mesh"], full_finetuning=report["full_finetuning"],
        num_microbatches=report["num_microbatches"], frozen_weights=report["frozen_weights"])
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true", help="the speed table (predicted) instead of capacity")
    parser.add_argument("--hlo", nargs="*", default=[], help="--dump_hlo directories, one per report, to re-predict")
    parser.add_argument("reports", nargs="+")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    for i, hlo_dir in enumerate(args.hlo):
        if reports[i]["per_device"]:
            repredict(reports[i], Path(hlo_dir))
    if args.speed:
        print(SPEED_HEADER)
        for report in reports:
            print(speed_row(reminimum(report) if report.get("weight_gathers") else report))
        return
    print("| trains | topology | mesh | batch | attention | fits | compiler, per device | estimate (/ compiler) | "
          "collectives per step (count x GiB) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        print(row(report))


if __name__ == "__main__":
    main()
