"""Per-device training memory of the 7B TTT config on common meshes, and a check of the estimator.

    python bench/memory_estimate.py [--config configs/moshi_7b_ttt.py] [--validate]

1. A table of `tttjax.analysis.memory.estimate_memory` (the start-up check's numbers) for the 7B config
   (batch 16 x 100 s, LoRA rank 128, TTT at layers 1,5,10, bf16) on TPU v5p-64 (32 chips of
   95 GiB), v5p-128, 8 x H100 (80 GB) and 16 x H100, for each remat policy.
2. --validate: the estimate against XLA's own buffer assignment (`compiled.memory_analysis()`:
   arguments + outputs - donated aliases + temporaries) of the real train step, compiled on one CPU
   device for a scaled-down fp32 model, for each remat policy. CPU fusion differs from TPU/GPU, so
   this checks the activation formulas' scale and the remat ordering, not accelerator-exact bytes.

Writes bench/results/memory_estimate.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import jax

from tttjax.analysis import memory
from tttjax.data import num_frames
from tttjax.model.config import from_run_config as model_config
from tttjax.train.program import build_program

RESULTS = Path(__file__).resolve().parent / "results" / "memory_estimate.json"
GB = 10**9

# name, platform (what attention `auto` picks), device memory (bytes), rows of (data, fsdp, tensor, global batch)
TARGETS = [
    ("TPU v5p-64 (32 chips)", "tpu", 95 * memory.GiB, [(1, 16, 2, 16), (2, 8, 2, 16), (1, 32, 1, 32), (32, 1, 1, 32)]),
    ("TPU v5p-128 (64 chips)", "tpu", 95 * memory.GiB, [(1, 64, 1, 64), (1, 16, 4, 16)]),
    ("8 x H100 80GB", "gpu", 80 * GB, [(1, 8, 1, 16), (2, 4, 1, 16), (1, 4, 2, 16), (8, 1, 1, 16)]),
    ("16 x H100 80GB (2 nodes)", "gpu", 80 * GB, [(2, 8, 1, 16), (1, 16, 1, 16)]),
]


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def table(config) -> list[dict]:
    rows = []
    print(f"{'target':<26} {'mesh (d,f,t)':<13} {'batch':>5} {'remat':<5} {'params':>7} {'train':>7} "
          f"{'acts':>7} {'logits':>7} {'total':>7}  fits   (GiB per device)")
    for name, platform, capacity, meshes in TARGETS:
        for data, fsdp, tensor, batch in meshes:
            for remat in ("full", "dots", "none"):
                config.remat = remat
                e = memory.estimate_memory(model_config(config), batch_size=batch,
                                           num_microbatches=config.num_microbatches,
                                           num_frames=num_frames(config.duration_sec),
                                           full_finetuning=config.full_finetuning,
                                           mesh_axes={"data": data, "fsdp": fsdp, "tensor": tensor},
                                           platform=platform)
                acts = e.saved_activations + e.layer_workspace
                fits = e.total <= capacity
                print(f"{name:<26} {str((data, fsdp, tensor)):<13} {batch:>5} {remat:<5} "
                      f"{(e.frozen_params + e.gathered_weights) / memory.GiB:7.1f} "
                      f"{e.trainable_state / memory.GiB:7.1f} "
                      f"{acts / memory.GiB:7.1f} {e.logits / memory.GiB:7.1f} {e.total / memory.GiB:7.1f}  "
                      f"{'yes' if fits else 'NO'}")
                rows.append(dict(target=name, mesh=[data, fsdp, tensor], batch=batch, remat=remat, capacity=capacity,
                                 fits=fits, **{k: v for k, v in vars(e).items()}, total=e.total))
    return rows


VALIDATION_CASES = [  # (duration_sec, batch, remat, ttt.scan_remat_group)
    (16.0, 2, "none", 1), (16.0, 2, "dots", 1), (16.0, 2, "full", 1), (80.0, 1, "full", 4), (80.0, 1, "dots", 4),
]


def validate(config_path: str) -> list[dict]:
    """Estimate vs XLA's buffer assignment for a scaled-down model on one CPU device."""
    out = []
    print("\nestimate vs XLA (1 CPU device, fp32, dim 512 x 4 layers, TTT at layer 1, LoRA 16; MiB, without the "
          "15% margin):")
    print(f"{'frames':>6} {'batch':>5} {'remat':<5} {'group':>5} {'estimate':>9} {'xla':>9} {'ratio':>6}")
    for duration, batch, remat, group in VALIDATION_CASES:
        c = load_config(config_path)
        c.model.update(dim=512, num_heads=8, num_layers=4, text_card=2000, card=256, depformer_dim=256,
                       depformer_num_layers=2, depformer_num_heads=4, depformer_dim_feedforward=1056, context=3000)
        c.lora.rank, c.ttt.enable, c.ttt.layers, c.ttt.mini_batch_size = 16, True, "1", 16
        c.ttt.scan_remat_group = group
        c.param_dtype = c.dtype = "float32"
        c.remat, c.batch_size, c.duration_sec, c.num_microbatches = remat, batch, duration, 1
        c.first_codebook_weight_multiplier, c.text_padding_weight = 1.0, 0.5
        program = build_program(c, jax.devices()[:1])  # the trainer's own step, lowered abstractly
        cfg, T = program.cfg, num_frames(c.duration_sec)
        m = program.lower().compile().memory_analysis()
        xla = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        e = memory.estimate_memory(cfg, batch_size=batch, num_frames=T, platform=jax.default_backend())
        est = e.total - e.margin
        print(f"{T:>6} {batch:>5} {remat:<5} {group:>5} {est / 2**20:9.0f} {xla / 2**20:9.0f} {est / xla:6.2f}",
              flush=True)
        out.append(dict(frames=T, batch=batch, remat=remat, scan_remat_group=group, estimate=est, xla=xla,
                        xla_temp=m.temp_size_in_bytes, xla_arguments=m.argument_size_in_bytes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "moshi_7b_ttt.py"))
    parser.add_argument("--validate", action="store_true", help="also compare with XLA's buffer assignment on CPU")
    args = parser.parse_args()
    results = {"config": args.config, "table": table(load_config(args.config))}
    if args.validate:
        results["validate"] = validate(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
