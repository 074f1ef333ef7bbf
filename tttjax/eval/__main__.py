"""Evaluate a checkpoint: standard metrics, paper metrics, or both.

    python -m tttjax.eval --checkpoint_dir DIR [--config=configs/x.py [--config.a.b=v ...]]
        --data DATA --eval_type standard|paper_metrics|both [--batch_size N]
        [--paper_data swuggy=DIR,sblimp=DIR,sstorycloze=DIR,tstorycloze=DIR | m.jsonl]
        [--no_ttt_verify] [--output_json F]

DIR: a training step dir (runs/x/checkpoints/checkpoint_000100) or an imported checkpoint
(python -m conversion.from_pytorch). DATA: a dataset spec (prepared DATA_DIR, synthetic:N,
tfds:..., mixtures; default: the run's data.eval_data) or a codes.npy [N, 17, T] evaluated row by
row as given. Loss weights of train_objective: --config if given, else the run's args.yaml (step
dir), else configs/base.py's (first_codebook_weight_multiplier 100, text_padding_weight 0.5).
See docs/eval.md.
"""

from __future__ import annotations

import sys

from tttjax.errors import UserError
from tttjax.host_malloc import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # before JAX is imported: the process executes itself again once

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from tttjax import cli, rundir  # noqa: E402
from tttjax.checkpoint.compat import check_compatible, effective_architecture  # noqa: E402
from tttjax.config import reader  # noqa: E402
from tttjax.config.schema import default_config  # noqa: E402
from tttjax.data import num_frames  # noqa: E402
from tttjax.data.codes import load_codes  # noqa: E402
from tttjax.data.streams import MIMI_CARD  # noqa: E402
from tttjax.eval import evaluators, paper, standard  # noqa: E402
from tttjax.eval.metrics import format_table  # noqa: E402
from tttjax.model.config import from_run_config  # noqa: E402
from tttjax.model.moshi import initial_tokens  # noqa: E402
from tttjax.verify import verify  # noqa: E402
from tttjax.weights.loader import open_weights  # noqa: E402
from tttjax.weights.sources import materialize  # noqa: E402

# The project's defaults (the config schema), for a checkpoint without a run config.
DEFAULT_WEIGHTS = {k: default_config()[k] for k in ("first_codebook_weight_multiplier", "text_padding_weight")}
DEFAULT_MIMI = "kyutai/moshiko-pytorch-bf16"


class EvalError(UserError):
    """A user error: printed as one line, exit status 1."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tttjax.eval", description=__doc__.split("\n")[0],
                                epilog="Full reference: docs/eval.md")
    cli.add_checkpoint_dir(p)
    p.add_argument("--data", default=None, help="dataset spec or codes.npy [N, 17, T] (standard metrics)")
    p.add_argument("--eval_type", default=None, choices=["standard", "paper_metrics", "both"],
                   help="default: standard, unless --evals is given")
    p.add_argument("--evals", default=None,
                   help="run these evals.* entries of --config (else of the run's args.yaml): "
                        "standard,long_context,paper_metrics; their files go where training writes them")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max_batches", type=int, default=0, help="standard: stop after this many batches (0 = all)")
    p.add_argument("--duration_sec", type=float, default=None,
                   help="dataset examples are cut/padded to this (default: the run's, or the prepared data's)")
    cli.add_dtype(p, help="compute dtype (default: the checkpoint's)")
    cli.add_attention_impl(p)
    p.add_argument("--no_ttt_verify", action="store_true", help="skip the TTT parameter verification")
    cli.add_output_json(p, help="write every result and setting here")
    g = p.add_argument_group("paper metrics")
    g.add_argument("--paper_data", action="append", default=[],
                   help="task=PATH[,task=PATH...]: PATH is an official layout dir (sLM21 gold.csv + wavs, or "
                        "*_correct.wav/*_incorrect.wav stories) or a manifest .jsonl (then task= is optional)")
    g.add_argument("--paper_split", default=None, help="sLM21 split: dev (default) or test")
    g.add_argument("--max_pairs", type=int, default=0, help="use the first N pairs of each task (0 = all)")
    g.add_argument("--score_codebooks", default="semantic", choices=list(paper.CODEBOOK_CHOICES),
                   help="which Moshi codebooks score a sample")
    g.add_argument("--score_norm", default="mean", choices=list(paper.NORM_CHOICES),
                   help="mean log-likelihood per scored token, or the sum")
    g.add_argument("--score_semantic_weight", type=float, default=100.0, help="q0 weight of --score_codebooks=weighted")
    g.add_argument("--user_stream", default="silence", choices=list(paper.USER_STREAM_CHOICES),
                   help="the user stream during scoring: Mimi silence codes or -1")
    g.add_argument("--text_stream", default="zero", choices=list(paper.TEXT_STREAM_CHOICES),
                   help="the text stream: -1 or pad (3)")
    g.add_argument("--length_bucket", type=int, default=16,
                   help="pad scored sequences to a multiple of this many frames (fewer compiled shapes)")
    g.add_argument("--mimi_weight", default=DEFAULT_MIMI, help="Mimi safetensors, hf://org/repo/file or repo id")
    g.add_argument("--mimi_device", default=None, help="torch device for Mimi (default: cuda if available)")
    g.add_argument("--codes_cache", default=None, help="cache dir of encoded wavs (default ~/.cache/tttjax/eval_codes)")
    g.add_argument("--scores_dir", default=None,
                   help="ZeroSpeech-format `name score` files + the manifests used (default: beside --output_json)")
    p.add_argument("--config", default=None,
                   help="config file (configs/x.py) supplying the loss weights; --config.a.b=v overrides")
    spec, overrides, rest = reader.split_config_args(argv)
    args = p.parse_args(rest)
    if overrides and not spec:
        p.error("--config.* overrides need --config")
    args.config, args.config_overrides = spec, overrides
    return args


# -- configuration -------------------------------------------------------------------------------
def loss_weights(config, spec: str | None, weights) -> tuple[dict, str]:
    """The loss weights of train_objective and where they came from: `config` (--config=spec), which
    must describe the checkpoint's model, else the run's args.yaml, else moshi-finetune's defaults."""
    if config is not None:
        config_cfg = from_run_config(config)
        try:
            check_compatible(effective_architecture(weights.cfg), effective_architecture(config_cfg),
                             source=f"checkpoint {weights.path}")
        except ValueError as e:
            raise EvalError(f"--config={spec} describes another model: {e}") from None
        source = f"--config={spec}"
    elif weights.run_config is not None:
        config, source = weights.run_config, str(rundir.run_dir_of(weights.path) / rundir.ARGS_FILE)
    else:
        return dict(DEFAULT_WEIGHTS), "configs/base.py defaults"
    return {k: float(config[k]) for k in DEFAULT_WEIGHTS}, source


# -- standard metrics ----------------------------------------------------------------------------
def _num_frames(args, spec: str, run) -> int:
    if args.duration_sec is not None:
        if args.duration_sec <= 0:
            raise EvalError(f"--duration_sec={args.duration_sec} must be positive")
        return num_frames(args.duration_sec)
    if run is not None:
        return num_frames(float(run.duration_sec))
    meta = Path(spec) / "metadata.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        duration = data.get("inputs", {}).get("duration_sec")
        if duration:
            return num_frames(float(duration))
        if duration == 0 and data.get("max_frames_per_example"):  # whole files: the longest one
            return int(data["max_frames_per_example"])
    raise EvalError(f"--data={spec}: pass --duration_sec (the example length) for this dataset")


def _data_spec(args, run) -> str:
    spec = args.data or (run.evals.standard.data if run is not None else "")
    if not spec:
        raise EvalError("--data is required for standard metrics (a dataset spec or a codes.npy)")
    return spec


def run_standard(args, model, run, weights: dict) -> dict:
    cfg = model.cfg
    spec = _data_spec(args, run)
    if standard.is_codes_file(spec):
        try:
            codes = load_codes(spec, initial_tokens(cfg))  # each stream's initial token = its vocab size
        except (ValueError, FileNotFoundError) as e:
            raise EvalError(f"--data: {e}") from None
        batches = standard.codes_batches(codes, args.batch_size)
        info = {"data": spec, "kind": "codes.npy", "rows": int(codes.shape[0]), "frames": int(codes.shape[2])}
    else:
        frames = _num_frames(args, spec, run)
        seed = int(run.seed) if run is not None else 0
        try:
            batches = standard.dataset_batches(spec, cfg, num_frames=frames, batch_size=args.batch_size, seed=seed)
        except (ValueError, FileNotFoundError) as e:
            raise EvalError(f"--data={spec}: {e}") from None
        info = {"data": spec, "kind": "dataset", "frames": frames, "seed": seed}
    metrics = standard.Evaluator(**weights, check_memory=True)(model, batches, max_batches=args.max_batches)
    print(format_table(metrics, **weights))
    return {**info, "batch_size": args.batch_size, "loss_weights": weights, "metrics": metrics,
            "legacy_perplexity_2_pow_train_objective": 2.0 ** metrics["train_objective"]}


def run_configured(args, model, weights, config) -> dict:
    """The `--evals` entries of the config, as the trainer runs them, on this checkpoint."""
    names = evaluators.parse_names(args.evals)
    config = config if config is not None else weights.run_config
    if config is None:
        raise EvalError(f"--evals={args.evals}: {weights.path} has no run config; pass --config with the evals.* "
                        f"settings")
    step = rundir.step_number(weights.path) if weights.kind == rundir.STEP else None
    out_dir = rundir.evals_dir(rundir.run_dir_of(weights.path)) if step is not None else Path("eval").absolute()
    evaluations, _ = evaluators.build(config, model.cfg, None, out_dir, only=names)
    results = {}
    for evaluation in evaluations:
        results[evaluation.name] = evaluation(model, step=step)
        print(f"{evaluation.name}: {evaluation.line(results[evaluation.name])}")
    return results


# -- main ----------------------------------------------------------------------------------------
def evaluate(args) -> int:
    if args.eval_type is None and not args.evals:
        args.eval_type = "standard"
    want_standard = args.eval_type in ("standard", "both")
    want_paper = args.eval_type in ("paper_metrics", "both")
    if args.batch_size < 1:
        raise EvalError(f"--batch_size={args.batch_size} must be >= 1")
    if args.output_json:  # before the evaluation, not after it
        rundir.check_output_file(args.output_json, "--output_json")
    if want_paper:  # fail on bad inputs before the (slow) model load
        pairs, sources = paper.collect_pairs(paper.parse_paper_data(args.paper_data), args.paper_split,
                                             args.max_pairs)
    weights = open_weights(args.checkpoint_dir, attention_impl=args.attention_impl,
                           **({"dtype": args.dtype} if args.dtype else {}))
    if want_standard:
        _data_spec(args, weights.run_config)
    config = reader.load(args.config, args.config_overrides) if args.config else None
    if want_paper and weights.cfg.card < MIMI_CARD:
        raise EvalError(f"paper metrics need a model over Mimi codes (card {MIMI_CARD}); {weights.path} has "
                        f"card={weights.cfg.card}")
    model = materialize(weights.cfg, weights.source, source_name=str(weights.path))
    loss, loss_source = loss_weights(config, args.config, weights)
    result = {"checkpoint_dir": str(weights.path.absolute()), "eval_type": args.eval_type,
              "model": {"ttt_layers": list(model.cfg.ttt_layers), "lora_rank": model.cfg.lora_rank,
                        "dtype": model.cfg.dtype, "param_dtype": model.cfg.param_dtype},
              "loss_weights_source": loss_source}
    if model.cfg.ttt_layers and not args.no_ttt_verify:
        report = verify(weights.path, model=model)
        print(report.format())
        result["ttt_verify"] = report.to_json()
        if not report.ok:
            _write_json(args.output_json, result)
            raise EvalError(f"TTT verification of {weights.path} failed ({len(report.problems())} problems listed "
                            f"above); --no_ttt_verify skips it")
    if want_standard:
        result["standard"] = run_standard(args, model, weights.run_config, loss)
    if args.evals:
        result["evals"] = run_configured(args, model, weights, config)
    if want_paper:
        scores_dir = Path(args.scores_dir) if args.scores_dir else (
            Path(args.output_json).with_suffix("").with_name(Path(args.output_json).stem + "_scores")
            if args.output_json else None)
        scoring = paper.Scoring(codebooks=args.score_codebooks, norm=args.score_norm,
                                semantic_weight=args.score_semantic_weight, user_stream=args.user_stream,
                                text_stream=args.text_stream)
        result["paper_metrics"] = paper.score_pairs(
            model, pairs, sources, scoring, mimi_weight=args.mimi_weight, codes_cache=args.codes_cache,
            mimi_device=args.mimi_device, batch_size=args.batch_size, length_bucket=args.length_bucket,
            scores_dir=scores_dir)
    _write_json(args.output_json, result)
    return 0


def _write_json(path, result) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True, default=float))
        print(f"wrote {path}")


def main(argv=None) -> int:
    return cli.run(lambda argv: evaluate(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
