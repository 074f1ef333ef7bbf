"""Export a tttjax model or checkpoint to the PyTorch (moshi) safetensors layout.

    python -m conversion.to_pytorch --checkpoint_dir DIR --out OUT [--dtype bfloat16|float16|float32]
        [--adapters_only] [--layout moshi|release]

Writes either the full model with LoRA merged (`consolidated.safetensors`, config.json says
`"lora": false`) or the adapters only (`lora.safetensors`: LoRA A/B + every TTT tensor, config.json
with the lora keys), streaming tensor by tensor (tttjax/weights/export.py). The CLI never builds the
model when the checkpoint's base weights are on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

import jax

from tttjax import cli, rundir
from tttjax.weights import layout
from tttjax.weights.export import plan_export
from tttjax.weights.loader import open_weights


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during the export (a KeyboardInterrupt, so no `except Exception` takes it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so the export's writer removes its
    .partial file (SIGTERM's default would end the process at once); a second signal during that
    clean-up is ignored."""

    def interrupt(signum, _frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    saved = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.to_pytorch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_dir(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--adapters_only", action="store_true", help="lora.safetensors: LoRA A/B + TTT tensors")
    parser.add_argument("--layout", default="moshi", choices=list(layout.LAYOUTS),
                        help="moshi: in-memory names (moshi-finetune); release: fused names")
    args = parser.parse_args(argv)
    try:
        with _signals_interrupt():
            rundir.check_output_dir(args.out, "--out")
            weights = open_weights(args.checkpoint_dir)
            export = plan_export(weights.cfg, weights.source, layout_name=args.layout, dtype=args.dtype,
                                 adapters_only=args.adapters_only)
            target = export.write(args.out, writer=jax.process_index() == 0)
    except Interrupted as e:
        cli.error(f"interrupted by {e.signal.name}: no export written to {args.out} (no partial file left)")
        return 128 + e.signal
    print(f"wrote {target} ({len(export.rows)} tensors, {args.dtype}, layout {args.layout})")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
