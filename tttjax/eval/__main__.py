"""Evaluate a checkpoint: standard metrics, paper metrics, or both.

    python -m tttjax.eval --checkpoint_dir DIR [--config=configs/x.py [--config.a.b=v ...]]
        --data DATA --eval_type standard|paper_metrics|both [--batch_size N]
        [--paper_data swuggy=DIR,sblimp=DIR,sstorycloze=DIR,tstorycloze=DIR | m.jsonl]
        [--no_ttt_verify] [--output_json F]

DIR: a training step dir (runs/x/checkpoints/checkpoint_000100) or an imported checkpoint
(python -m conversion.from_pytorch). DATA: a dataset spec (prepared DATA_DIR, synthetic:N,
tfds:..., mixtures; default: the run's data.eval_data) or a codes.npy [N, 17, T] evaluated row by
row as given. Loss weights of train_objective: --config if given, else the run's args.yaml (step
dir), else moshi-finetune's defaults (first_codebook_weight_multiplier 1, text_padding_weight 0.5).
See docs/eval.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

# moshi-finetune's TrainArgs defaults.
DEFAULT_WEIGHTS = {"first_codebook_weight_multiplier": 1.0, "text_padding_weight": 0.5}
DEFAULT_MIMI = "kyutai/moshiko-pytorch-bf16"


class EvalError(ValueError):
    """A user error: printed as one line, exit status 1."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tttjax.eval", description=__doc__.split("\n")[0],
                                epilog="Full reference: docs/eval.md")
    p.add_argument("--checkpoint_dir", required=True, help="training step dir or imported checkpoint dir")
    p.add_argument("--config", default=None,
                   help="config file (configs/x.py) supplying the loss weights; --config.a.b=v overrides")
    p.add_argument("--data", default=None, help="dataset spec or codes.npy [N, 17, T] (standard metrics)")
    p.add_argument("--eval_type", default="standard", choices=["standard", "paper_metrics", "both"])
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max_batches", type=int, default=0, help="standard: stop after this many batches (0 = all)")
    p.add_argument("--duration_sec", type=float, default=None,
                   help="dataset examples are cut/padded to this (default: the run's, or the prepared data's)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--no_ttt_verify", action="store_true", help="skip the TTT parameter verification")
    p.add_argument("--output_json", default=None, help="write every result and setting here")
    g = p.add_argument_group("paper metrics")
    g.add_argument("--paper_data", action="append", default=[],
                   help="task=PATH[,task=PATH...]: PATH is an official layout dir (sLM21 gold.csv + wavs, or "
                        "*_correct.wav/*_incorrect.wav stories) or a manifest .jsonl (then task= is optional)")
    g.add_argument("--paper_split", default=None, help="sLM21 split: dev (default) or test")
    g.add_argument("--max_pairs", type=int, default=0, help="use the first N pairs of each task (0 = all)")
    g.add_argument("--score_codebooks", default="semantic", choices=["semantic", "all", "weighted"],
                   help="which Moshi codebooks score a sample")
    g.add_argument("--score_norm", default="mean", choices=["mean", "sum"],
                   help="mean log-likelihood per scored token, or the sum")
    g.add_argument("--score_semantic_weight", type=float, default=100.0, help="q0 weight of --score_codebooks=weighted")
    g.add_argument("--user_stream", default="silence", choices=["silence", "zero"],
                   help="the user stream during scoring: Mimi silence codes or -1")
    g.add_argument("--text_stream", default="zero", choices=["zero", "pad"], help="the text stream: -1 or pad (3)")
    g.add_argument("--length_bucket", type=int, default=16,
                   help="pad scored sequences to a multiple of this many frames (fewer compiled shapes)")
    g.add_argument("--mimi_weight", default=DEFAULT_MIMI, help="Mimi safetensors, hf://org/repo/file or repo id")
    g.add_argument("--mimi_device", default=None, help="torch device for Mimi (default: cuda if available)")
    g.add_argument("--codes_cache", default=None, help="cache dir of encoded wavs (default ~/.cache/tttjax/eval_codes)")
    g.add_argument("--scores_dir", default=None,
                   help="ZeroSpeech-format `name score` files + the manifests used (default: beside --output_json)")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if item.startswith("--config.") and "=" in item:
            overrides.append(item[len("--config."):].split("=", 1))
        else:
            p.error(f"unrecognized argument {item}")
    if overrides and not args.config:
        p.error("--config.* overrides need --config")
    args.config_overrides = overrides
    return args


# -- configuration -------------------------------------------------------------------------------
def load_config_file(spec: str, overrides):
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise EvalError(f"--config={spec}: no such file")
    try:
        module_spec = importlib.util.spec_from_file_location(f"_tttjax_eval_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as e:  # the user's file: any error is a config error
        raise EvalError(f"--config={spec}: could not load it ({type(e).__name__}: {e})") from None
    for key, text in overrides:
        target = config
        *parents, leaf = key.split(".")
        try:
            for part in parents:
                target = target[part]
            if leaf not in target:
                raise KeyError(leaf)
            target[leaf] = yaml.safe_load(text)
        except (KeyError, TypeError, AttributeError):
            raise EvalError(f"--config.{key}: no such key in {spec}") from None
        except ValueError as e:
            raise EvalError(f"--config.{key}={text}: {e}") from None
    return config


def run_config(directory: Path):
    """The run's config (args.yaml) when DIR is a step dir, else None."""
    if not (directory / "state").is_dir():
        return None
    import ml_collections
    import yaml

    args = directory.absolute().parent.parent / "args.yaml"
    if not args.is_file():
        raise EvalError(f"{args} not found: {directory} is not a step dir of a tttjax run")
    return ml_collections.ConfigDict(yaml.safe_load(args.read_text()))


_IRRELEVANT_WITHOUT_TTT = ("ttt_num_heads", "ttt_base_lr", "ttt_mini_batch_size", "ttt_initial_gating_alpha",
                           "ttt_causal")


def _architecture(cfg) -> dict:
    arch = cfg.architecture()
    if not cfg.ttt_layers:
        for k in _IRRELEVANT_WITHOUT_TTT:
            arch.pop(k, None)
    if not cfg.lora_rank:
        arch.pop("lora_scaling", None)
    return arch


def check_config_matches(config, model_cfg, spec: str, directory: Path) -> None:
    from tttjax.checkpoint.compat import check_compatible
    from tttjax.train import state as state_lib

    try:
        config_cfg = state_lib.model_config(config)
    except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
        raise EvalError(f"--config={spec}: not a tttjax training config ({e})") from None
    try:
        check_compatible(_architecture(model_cfg), _architecture(config_cfg), source=f"checkpoint {directory}")
    except ValueError as e:
        raise EvalError(f"--config={spec} describes another model: {e}") from None


def loss_weights(args, directory: Path, model_cfg) -> tuple[dict, str]:
    if args.config:
        config = load_config_file(args.config, args.config_overrides)
        check_config_matches(config, model_cfg, args.config, directory)
        source = f"--config={args.config}"
    else:
        config = run_config(directory)
        source = f"{directory.absolute().parent.parent / 'args.yaml'}" if config is not None else \
            "moshi-finetune defaults"
    if config is None:
        return dict(DEFAULT_WEIGHTS), source
    try:
        weights = {k: float(config[k]) for k in DEFAULT_WEIGHTS}
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise EvalError(f"{source}: no usable loss weights ({e})") from None
    return weights, source


# -- standard metrics ----------------------------------------------------------------------------
def _num_frames(args, spec: str, run) -> int:
    from tttjax.data import num_frames

    if args.duration_sec is not None:
        if args.duration_sec <= 0:
            raise EvalError(f"--duration_sec={args.duration_sec} must be positive")
        return num_frames(args.duration_sec)
    if run is not None:
        return num_frames(float(run.duration_sec))
    meta = Path(spec) / "metadata.json"
    if meta.is_file():
        duration = json.loads(meta.read_text()).get("inputs", {}).get("duration_sec")
        if duration:
            return num_frames(float(duration))
    raise EvalError(f"--data={spec}: pass --duration_sec (the example length) for this dataset")


def run_standard(args, model, directory: Path, weights: dict) -> dict:
    from tttjax.eval import standard
    from tttjax.eval.metrics import format_table

    cfg = model.cfg
    run = run_config(directory)
    spec = args.data
    if spec is None and run is not None and run.data.eval_data:
        spec = run.data.eval_data
    if not spec:
        raise EvalError("--data is required for standard metrics (a dataset spec or a codes.npy)")
    if standard.is_codes_file(spec):
        try:
            codes = standard.load_codes_file(spec, cfg)
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
    metrics = standard.evaluate(model, batches, max_batches=args.max_batches, **weights)
    print(format_table(metrics, **weights))
    return {**info, "batch_size": args.batch_size, "loss_weights": weights, "metrics": metrics,
            "legacy_perplexity_2_pow_train_objective": 2.0 ** metrics["train_objective"]}


# -- paper metrics -------------------------------------------------------------------------------
def parse_paper_data(items: list[str], split: str | None) -> list[tuple[str | None, str]]:
    from tttjax.eval.manifest import canonical_task

    out = []
    for item in (s.strip() for chunk in items for s in chunk.split(",")):
        if not item:
            continue
        task, sep, path = item.partition("=")
        if not sep:
            task, path = None, item
        if task is not None:
            task = canonical_task(task)
        if not Path(path).exists():
            raise EvalError(f"--paper_data {item}: {path} does not exist")
        if task is None and not path.endswith(".jsonl"):
            raise EvalError(f"--paper_data {item}: a layout directory needs its task (swuggy=DIR, ...)")
        out.append((task, path))
    if not out:
        raise EvalError("--eval_type paper_metrics needs --paper_data task=PATH (see docs/eval.md)")
    return out


def collect_pairs(specs, split: str | None, max_pairs: int):
    from tttjax.eval.manifest import pairs_from_layout, read_manifest

    pairs, sources = [], {}
    for task, path in specs:
        if path.endswith(".jsonl"):
            rows = read_manifest(path)
            if task is not None:
                rows = [p for p in rows if p.task == task]
                if not rows:
                    raise EvalError(f"--paper_data {task}={path}: the manifest has no {task} rows")
        else:
            default_split = "dev" if task in ("swuggy", "sblimp") else "test"
            rows = pairs_from_layout(path, task, split or default_split)
        for t in sorted({p.task for p in rows}):
            if t in sources:
                raise EvalError(f"--paper_data: task {t} given twice ({sources[t]} and {path})")
            sources[t] = path
        if max_pairs:
            keep: dict[str, set] = {}
            limited = []
            for p in rows:
                ids = keep.setdefault(p.task, set())
                if p.pair_id in ids or len(ids) < max_pairs:
                    ids.add(p.pair_id)
                    limited.append(p)
            rows = limited
        pairs += rows
    return pairs, sources


def run_paper(args, model, pairs, sources, scores_dir: Path | None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tttjax.eval import memory, paper
    from tttjax.eval.audio import CodeCache
    from tttjax.eval.manifest import write_manifest

    cfg = model.cfg
    scoring = paper.Scoring(codebooks=args.score_codebooks, norm=args.score_norm,
                            semantic_weight=args.score_semantic_weight, user_stream=args.user_stream,
                            text_stream=args.text_stream)
    if args.length_bucket < 1:
        raise EvalError(f"--length_bucket={args.length_bucket} must be >= 1")
    bucket = args.length_bucket
    if cfg.ttt_layers and not cfg.ttt_causal:
        bucket = 1  # bidirectional TTT mini-batches see right padding: score at exact lengths
        print("note: ttt.causal=false: scoring each length unpadded (one compile per distinct length)")
    wavs = list(dict.fromkeys(w for p in pairs for w in (p.pos, p.neg)))
    cache = CodeCache(args.mimi_weight, args.codes_cache, batch_size=args.batch_size, device=args.mimi_device)
    tic = time.perf_counter()
    try:
        encoded = cache.codes(wavs, with_silence=scoring.user_stream == "silence")
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"paper metrics: {e}") from None
    print(f"Mimi codes of {len(wavs)} wavs: {cache.hits} cached, {cache.encoded} encoded "
          f"({time.perf_counter() - tic:.1f} s; cache {cache.cache_dir})")
    top = max(int(c.max()) for c, _ in encoded.values())
    if top >= cfg.card:
        raise EvalError(f"paper metrics: Mimi codes go up to {top} but the model's audio vocabulary is card="
                        f"{cfg.card}; this checkpoint cannot score Mimi audio")
    sequences = []
    silences: dict[int, np.ndarray] = {}
    for w in wavs:
        codes, samples = encoded[w]
        silence = None
        if scoring.user_stream == "silence":
            if samples not in silences:
                silences[samples] = cache.silence(samples)
            silence = silences[samples]
        sequences.append(paper.build_sequence(codes, silence, scoring, cfg.n_q))

    token_ce = paper.make_token_ce_fn(cfg)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, c, n: token_ce(nnx.merge(graphdef, s), c, n))
    checked: set = set()

    def run_batch(codes, lengths):
        shape = codes.shape
        if shape not in checked:
            memory.check_batch(cfg, shape[0], shape[2])
            checked.add(shape)
        try:
            return jax.device_get(fn(state, jnp.asarray(codes), jnp.asarray(lengths)))
        except Exception as e:  # XlaRuntimeError has no stable import path
            if memory.is_oom(e):
                raise memory.BatchTooLarge(memory.oom_message(shape[0], shape[2])) from None
            raise

    tic = time.perf_counter()
    values = paper.score_sequences(run_batch, sequences, scoring.codebook_weights(cfg.dep_q), norm=scoring.norm,
                                   batch_size=args.batch_size, bucket=bucket, num_codebooks=cfg.num_codebooks)
    if not np.all(np.isfinite(values)):
        bad = [w for w, v in zip(wavs, values) if not np.isfinite(v)]
        raise EvalError(f"paper metrics: {len(bad)} wavs got no score (too short to have a scored token?), "
                        f"e.g. {bad[0]}")
    scores = dict(zip(wavs, values.tolist()))
    results = paper.aggregate(pairs, scores)
    print(paper.format_table(results, scoring))
    out = {"scoring": scoring.to_json(), "tasks": results, "sources": sources, "num_wavs": len(wavs),
           "length_bucket": bucket, "scoring_seconds": time.perf_counter() - tic}
    if scores_dir is not None:
        files = paper.write_zerospeech(scores_dir, pairs, scores)
        for task in sorted({p.task for p in pairs}):
            write_manifest(scores_dir / "manifests" / f"{task}.jsonl", [p for p in pairs if p.task == task])
        out["scores_files"] = [str(f) for f in files]
        out["manifests"] = str(scores_dir / "manifests")
        print(f"wrote ZeroSpeech-format scores and the manifests used to {scores_dir}")
    else:
        print("note: pass --scores_dir or --output_json to write the ZeroSpeech-format score files")
    return out


# -- main ----------------------------------------------------------------------------------------
def _load_model(directory: Path, dtype: str | None):
    from tttjax.checkpoint.model_dir import load_model

    if not directory.is_dir():
        raise EvalError(f"--checkpoint_dir={directory}: no such directory")
    if not (directory / "state").is_dir() and not (directory / "config.json").is_file():
        raise EvalError(f"--checkpoint_dir={directory}: neither a training step dir (state/) nor an imported "
                        f"checkpoint (config.json + params/)")
    try:
        return load_model(directory, **({"dtype": dtype} if dtype else {}))
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"--checkpoint_dir={directory}: {e}") from None


def evaluate(args) -> int:
    directory = Path(args.checkpoint_dir)
    want_standard = args.eval_type in ("standard", "both")
    want_paper = args.eval_type in ("paper_metrics", "both")
    if args.batch_size < 1:
        raise EvalError(f"--batch_size={args.batch_size} must be >= 1")
    if want_paper:
        from tttjax.eval.manifest import ManifestError

        try:  # fail on bad inputs before the (slow) model load
            pairs, sources = collect_pairs(parse_paper_data(args.paper_data, args.paper_split),
                                           args.paper_split, args.max_pairs)
        except ManifestError as e:
            raise EvalError(str(e)) from None
    if want_standard and not args.data:
        run = run_config(directory) if directory.is_dir() else None
        if run is None or not run.data.eval_data:
            raise EvalError("--data is required for standard metrics (a dataset spec or a codes.npy)")
    if args.config:
        load_config_file(args.config, args.config_overrides)  # fail early on a broken config
    model = _load_model(directory, args.dtype)
    if want_paper:
        from tttjax.data.streams import MIMI_CARD

        if model.cfg.card < MIMI_CARD:
            raise EvalError(f"paper metrics need a model over Mimi codes (card {MIMI_CARD}); {directory} has "
                            f"card={model.cfg.card}")
    weights, weights_source = loss_weights(args, directory, model.cfg)
    result = {"checkpoint_dir": str(directory.absolute()), "eval_type": args.eval_type,
              "model": {"ttt_layers": list(model.cfg.ttt_layers), "lora_rank": model.cfg.lora_rank,
                        "dtype": model.cfg.dtype, "param_dtype": model.cfg.param_dtype},
              "loss_weights_source": weights_source}
    if model.cfg.ttt_layers and not args.no_ttt_verify:
        from tttjax.verify import verify

        report = verify(directory, model=model)
        print(report.format())
        result["ttt_verify"] = report.to_json()
        if not report.ok:
            _write_json(args.output_json, result)
            raise EvalError(f"TTT verification of {directory} failed ({len(report.problems())} problems listed "
                            f"above); --no_ttt_verify skips it")
    if want_standard:
        result["standard"] = run_standard(args, model, directory, weights)
    if want_paper:
        scores_dir = Path(args.scores_dir) if args.scores_dir else (
            Path(args.output_json).with_suffix("").with_name(Path(args.output_json).stem + "_scores")
            if args.output_json else None)
        result["paper_metrics"] = run_paper(args, model, pairs, sources, scores_dir)
    _write_json(args.output_json, result)
    return 0


def _write_json(path, result) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True, default=float))
        print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tttjax.eval.manifest import ManifestError
    from tttjax.eval.memory import BatchTooLarge

    try:
        return evaluate(args)
    except (EvalError, ManifestError, BatchTooLarge) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from tttjax.host_malloc import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
