"""The capacity table of docs/distributed.md and BENCHMARKS.md from `tttjax.compile` reports.

    python -m tttjax.compile --config=configs/moshi_7b_ttt.py --topology=v5p-8 --output_json r1.json
    ...
    python bench/capacity.py r1.json r2.json ...

Prints one markdown row per report: what trains, topology and mesh, batch x duration, the temporal
attention (reports written before attention_impl existed compiled full scores: xla), fits, the
compiler's per-device total against HBM (headroom), the estimate and its ratio, the collectives
of one step (count and GiB by kind, DCN share) and compile seconds.
"""

from __future__ import annotations

import json
import sys

GiB = 1024 ** 3
KINDS = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "CP"}


def row(report: dict) -> str:
    trains = "full fine-tuning" if report["full_finetuning"] else "LoRA 128 + TTT 1,5,10"
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1) or "1 device"
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
    return (f"| {trains} | {report['topology']} | {mesh} | {report['batch_size']} x {report['duration_sec']:g} s | "
            f"{report.get('attention_impl', 'xla')} | {'yes' if report['fits'] else 'NO'} | {memory} | {report['estimate_bytes'] / GiB:.2f} GiB ({ratio}) | "
            f"{collectives} | {report['compile_s']:.0f} |")


def main(paths: list[str]) -> None:
    print("| trains | topology | mesh | batch | attention | fits | compiler, per device | estimate (/ compiler) | "
          "collectives per step (count x GiB) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            print(row(json.load(f)))


if __name__ == "__main__":
    main(sys.argv[1:])
