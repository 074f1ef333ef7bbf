"""Evaluators from config (big_vision's pluggable evaluators): the `evals.<type>` entries.

Each entry has a `freq` (the trainer runs it every that many steps; 0 = never), its `data` and
its own options; `build(config, ...)` makes the evaluations a run asks for, and the trainer and
`python -m tttjax.eval --evals` run the same objects:

* `standard`: token-weighted CE / perplexity per stream and codebook (`Evaluator`), on a dataset
  spec, the run's batch size and sequence length;
* `long_context`: CE at each frame index of codes .npy files through the chunked streaming
  forward (the TTT state carried), with its CSV / JSON / PNG per step;
* `paper_metrics`: sWUGGY / sBLIMP / StoryCloze pairwise accuracies, with the ZeroSpeech-format
  score files per step.
An evaluation is called as `evaluation(model, step=N)` and returns its JSON-able results;
`scalars(results)` are what the trainer logs under `split`, `line(results)` its console line.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax

from tttjax import data as data_lib
from tttjax import rundir
from tttjax.data.codes import load_codes
from tttjax.errors import ConfigError
from tttjax.eval import long_context, paper
from tttjax.eval.standard import Evaluator
from tttjax.model.moshi import initial_tokens
from tttjax.parallel.sharding import global_batch, process_batch_slice

TYPES = ("standard", "long_context", "paper_metrics")


def _step_dir(out_dir: Path, step: int | None) -> Path:
    return out_dir / (f"step_{step:0{rundir.STEP_DIGITS}d}" if step is not None else "checkpoint")


class StandardEval:
    name, split = "standard", "eval"

    def __init__(self, entry, config, cfg, mesh):
        self.freq, self.max_batches, self.batch_size, self.mesh = entry.freq, entry.batches, config.batch_size, mesh
        self.dataset = data_lib.make_dataset(entry.data, num_frames=data_lib.num_frames(config.duration_sec),
                                             card=cfg.card, text_card=cfg.text_card, n_q=cfg.n_q, seed=config.seed)
        self.evaluator = Evaluator(text_padding_weight=config.text_padding_weight,
                                   first_codebook_weight_multiplier=config.first_codebook_weight_multiplier, mesh=mesh)

    def __call__(self, model, *, step: int | None = None) -> dict:
        if self.mesh is None:  # one process, the model on its default device (python -m tttjax.eval)
            batches = data_lib.make_eval_iterator(self.dataset, batch_size=self.batch_size)
        else:  # the trainer's: each process reads its rows of every global batch
            index, count = process_batch_slice(self.mesh, self.batch_size)
            batches = (global_batch(self.mesh, local, self.batch_size) for local in data_lib.make_eval_iterator(
                self.dataset, batch_size=self.batch_size, process_index=index, process_count=count))
        return self.evaluator(model, batches, max_batches=self.max_batches)

    def scalars(self, results: dict) -> dict[str, float]:
        return results

    def line(self, results: dict) -> str:
        return " ".join(f"{k}={results[k]:.4f}" for k in ("train_objective", "text_ce", "audio_ce"))


class LongContextEval:
    name, split = "long_context", "eval_long_context"

    def __init__(self, entry, cfg, out_dir: Path):
        self.freq, self.chunk_size, self.out_dir, self.context = entry.freq, entry.chunk_size, out_dir, cfg.context
        self.files = [f.strip() for f in entry.data.split(",") if f.strip()]
        self.codes = [load_codes(f, initial_tokens(cfg)) for f in self.files]

    def __call__(self, model, *, step: int | None = None) -> dict:
        if self.chunk_size:
            curve = long_context.chunked_curve(model, self.codes, chunk_size=self.chunk_size)
        else:
            curve = long_context.single_pass_curve(model, self.codes)
        settings = {"codes": self.files, "chunk_size": self.chunk_size, "step": step}
        if jax.process_index() != 0:
            return {**settings, "buckets": long_context.buckets_table(curve), "frames": curve.frames,
                    "slope_vs_ln_frame": long_context.log_slopes(curve)}
        return long_context.write_results(curve, _step_dir(self.out_dir, step), edges=long_context.DEFAULT_BUCKETS,
                                          context=self.context, title=f"step {step}: CE by frame", settings=settings)

    def scalars(self, results: dict) -> dict[str, float]:
        out = {f"slope_{k}": v for k, v in results["slope_vs_ln_frame"].items()}
        for row in results["buckets"]:
            lo = row["bucket"].strip("[").split(",")[0]
            out.update({f"from_{lo}_{k}": v for k, v in row.items() if k.endswith("_ce")})
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def line(self, results: dict) -> str:
        first, last = results["buckets"][0], results["buckets"][-1]
        return (f"audio_semantic_ce {first['bucket']} {first['audio_semantic_ce']:.4f} ... {last['bucket']} "
                f"{last['audio_semantic_ce']:.4f}; slope vs ln(frame) "
                f"{results['slope_vs_ln_frame']['audio_semantic']:.4f}")


class PaperMetricsEval:
    name, split = "paper_metrics", "eval_paper_metrics"

    def __init__(self, entry, cfg, out_dir: Path):
        if not entry.mimi_weight:
            raise ConfigError("evals.paper_metrics.mimi_weight: the Mimi safetensors that encodes the wavs is "
                              "required")
        self.entry, self.out_dir = entry, out_dir
        self.freq = entry.freq
        self.pairs, self.sources = paper.collect_pairs(paper.parse_paper_data([entry.data]), None, entry.max_pairs)

    def __call__(self, model, *, step: int | None = None) -> dict:
        entry = self.entry
        return paper.score_pairs(model, self.pairs, self.sources, paper.Scoring(), mimi_weight=entry.mimi_weight,
                                 codes_cache=None, mimi_device=None, batch_size=entry.batch_size, length_bucket=16,
                                 scores_dir=_step_dir(self.out_dir, step), log=lambda _: None)

    def scalars(self, results: dict) -> dict[str, float]:
        return {f"{task}_accuracy": r["accuracy"]["all"] for task, r in results["tasks"].items()}

    def line(self, results: dict) -> str:
        return " ".join(f"{k}={v:.3f}" for k, v in self.scalars(results).items())


def build(config, cfg, mesh, out_dir: Path, *, only: tuple[str, ...] | None = None) -> tuple[list, list[str]]:
    """(the evaluations `config.evals` asks for, notes on entries that cannot run), in TYPES order.

    An entry runs when it has data and a freq (or is named in `only`, as tttjax.eval does). Its
    outputs go under `out_dir/<type>/`."""
    evaluations, notes = [], []
    for name in only or TYPES:
        entry = config.evals[name]
        if not (entry.freq or only):
            continue
        if not entry.data:
            notes.append(f"evals.{name}.freq={entry.freq} but evals.{name}.data is empty: no {name} evaluation")
            continue
        if name == "standard":
            evaluations.append(StandardEval(entry, config, cfg, mesh))
        elif name == "long_context":
            evaluations.append(LongContextEval(entry, cfg, Path(out_dir) / name))
        else:
            evaluations.append(PaperMetricsEval(entry, cfg, Path(out_dir) / name))
    return evaluations, notes


def parse_names(text: str) -> tuple[str, ...]:
    """`--evals standard,long_context` -> the names, each one of TYPES."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in TYPES]
    if bad or not names:
        raise ConfigError(f"--evals={text}: expected names from {', '.join(TYPES)}")
    return names

