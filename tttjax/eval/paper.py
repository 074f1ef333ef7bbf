"""Paper metrics (sWUGGY, sBLIMP, sStoryCloze, tStoryCloze): pairwise log-likelihood accuracy.

Each wav becomes one sequence [17, F]: its Mimi codes in the Moshi stream (rows 1..8), the user
stream (rows 9..16) as Mimi silence codes of the same length or -1, the text stream (row 0) -1 or
pad (3). The model scores the Moshi-stream audio tokens it predicts:

    ll_sum  = - sum over scored tokens of  w_q * CE(t, q)
    ll_mean = ll_sum / sum over scored tokens of w_q

with w = [1, 0, ..., 0] (codebooks=semantic), all ones (all), or [alpha, 1, ..., 1] (weighted, the
training objective's semantic weight). Scored tokens are the frames the sequence really has, minus
each codebook's delayed tail (as moshi's LMModel masks it). The per-token CE comes back to the host
and is reduced in float64, so equal token sets give exactly equal scores.

A trial scores 1 if ll(pos) > ll(neg), 1/2 on a tie, else 0; trials of one pair (its voices) are
averaged; pairs are averaged per group and overall (ZeroSpeech 2021's by-pair protocol).
`score_pairs` runs the whole pipeline for `python -m tttjax.eval --eval_type paper_metrics`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.analysis import fit
from tttjax.data.streams import NO_TOKEN, TEXT_PAD
from tttjax.errors import UserError
from tttjax.eval.audio import CodeCache
from tttjax.eval.manifest import (
    Pair,
    canonical_task,
    pairs_from_layout,
    read_manifest,
    write_manifest,
)
from tttjax.objective import token_cross_entropy

CODEBOOK_CHOICES = ("semantic", "all", "weighted")
NORM_CHOICES = ("mean", "sum")
USER_STREAM_CHOICES = ("silence", "zero")
TEXT_STREAM_CHOICES = ("zero", "pad")


@dataclasses.dataclass(frozen=True)
class Scoring:
    codebooks: str = "semantic"
    norm: str = "mean"
    semantic_weight: float = 100.0  # alpha of codebooks=weighted
    user_stream: str = "silence"
    text_stream: str = "zero"

    def __post_init__(self):
        for name, choices in (("codebooks", CODEBOOK_CHOICES), ("norm", NORM_CHOICES),
                              ("user_stream", USER_STREAM_CHOICES), ("text_stream", TEXT_STREAM_CHOICES)):
            if getattr(self, name) not in choices:
                raise UserError(f"--score_{name}={getattr(self, name)!r}: expected one of {list(choices)}")

    def codebook_weights(self, dep_q: int) -> np.ndarray:
        if self.codebooks == "semantic":
            return np.eye(1, dep_q)[0]
        w = np.ones(dep_q)
        if self.codebooks == "weighted":
            w[0] = self.semantic_weight
        return w

    def describe(self) -> str:
        books = {"semantic": "semantic codebook (q0) only", "all": "all 8 Moshi codebooks",
                 "weighted": f"all 8 Moshi codebooks, q0 x {self.semantic_weight:g}"}[self.codebooks]
        norm = "mean log-likelihood per scored token" if self.norm == "mean" else "summed log-likelihood"
        user = "Mimi silence codes" if self.user_stream == "silence" else "-1 (no token)"
        text = "-1 (no token)" if self.text_stream == "zero" else "pad (3)"
        return (f"{norm}; {books}; sample in the Moshi stream, user stream = {user}, text stream = {text}; "
                f"ties count 1/2; trials averaged over voices per pair")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "sample_stream": "moshi", "tie": 0.5,
                "voice_averaging": "per pair", "description": self.describe()}


def build_sequence(codes: np.ndarray, silence: np.ndarray | None, scoring: Scoring, n_q: int) -> np.ndarray:
    """[1 + n_q, F] int32: text row, the sample's codes (Moshi stream), the user stream."""
    per_speaker = n_q // 2
    frames = codes.shape[1]
    seq = np.full((1 + n_q, frames), NO_TOKEN, np.int32)
    if scoring.text_stream == "pad":
        seq[0] = TEXT_PAD
    seq[1:1 + per_speaker] = codes[:per_speaker]
    if scoring.user_stream == "silence":
        if silence is None or silence.shape[1] != frames:
            raise UserError("user_stream=silence needs silence codes of the sample's length")
        seq[1 + per_speaker:] = silence[:per_speaker]
    return seq


def make_token_ce_fn(cfg):
    """(model, codes [B, 17, T], lengths [B]) -> masked per-token CE [B, dep_q, T] (0 where unscored)."""
    delays = jnp.asarray(cfg.delays[1:1 + cfg.dep_q])

    def token_ce(model, codes, lengths):
        out = model(codes)
        T = codes.shape[-1]
        t = jnp.arange(T)
        inside = t[None, None, :] < (lengths[:, None, None] - delays[None, :, None])
        mask = out.mask & inside
        return token_cross_entropy(out.logits, codes[:, 1:1 + cfg.dep_q], mask), mask

    return token_ce


def bucket_length(frames: int, bucket: int) -> int:
    return max(bucket, -(-frames // bucket) * bucket)


def batch_plan(lengths: list[int], batch_size: int, bucket: int) -> list[tuple[list[int], int]]:
    """Indices sorted by length, cut into batches, each padded to a bucketed length."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    plan = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        plan.append((idx, bucket_length(max(lengths[i] for i in idx), bucket)))
    return plan


def score_sequences(run_batch, sequences: list[np.ndarray], weights: np.ndarray, *, norm: str, batch_size: int,
                    bucket: int, num_codebooks: int, progress=None) -> np.ndarray:
    """Log-likelihood scores (float64) of each sequence.

    run_batch(codes [B, K, T] int32, lengths [B] int32) -> (ce [B, dep_q, T], mask [B, dep_q, T]) as numpy.
    Batches are always `batch_size` rows (padded with -1 rows) and `bucket`-multiple lengths, so the
    number of compiled shapes stays small.
    """
    lengths = [s.shape[1] for s in sequences]
    scores = np.zeros(len(sequences), np.float64)
    for idx, T in batch_plan(lengths, batch_size, bucket):
        codes = np.full((batch_size, num_codebooks, T), NO_TOKEN, np.int32)
        lens = np.zeros(batch_size, np.int32)
        for row, i in enumerate(idx):
            codes[row, :, :lengths[i]] = sequences[i]
            lens[row] = lengths[i]
        ce, mask = run_batch(codes, lens)
        ce = np.asarray(ce, np.float64)
        w = np.asarray(mask, np.float64) * weights[None, :, None]
        nll = (ce * w).sum(axis=(1, 2))
        count = w.sum(axis=(1, 2))
        for row, i in enumerate(idx):
            if norm == "sum":
                scores[i] = -nll[row]
            else:
                scores[i] = -nll[row] / count[row] if count[row] > 0 else float("nan")
        if progress is not None:
            progress(len(idx))
    return scores


def trial_outcome(pos: float, neg: float) -> float:
    """1 if the positive is likelier, 1/2 on a tie, 0 otherwise (a NaN score is an error upstream)."""
    return 1.0 if pos > neg else 0.5 if pos == neg else 0.0


def _band_accuracy(values: list[float]) -> dict:
    n = len(values)
    return {"n": n, "accuracy": float(np.mean(values)) if n else float("nan")}


def aggregate(pairs: list[Pair], scores: dict[str, float]) -> dict[str, dict]:
    """Per task: accuracy (overall and by variant), by-group breakdown, counts.

    sWUGGY: `all` (every pair with a frequency band), `in_vocab` (bands other than oov), `oov`;
    sBLIMP: `all` and `by_group` (BLiMP type); story tasks: `all`. Every number is a mean over
    pairs of the mean over that pair's trials (voices).
    """
    by_task: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_task[p.task].append(p)
    out = {}
    for task, items in sorted(by_task.items()):
        trials: dict[tuple, list[float]] = defaultdict(list)
        groups: dict[tuple, str] = {}
        for p in items:
            key = (p.split, p.pair_id)
            trials[key].append(trial_outcome(scores[p.pos], scores[p.neg]))
            groups[key] = p.group
        per_pair = {k: float(np.mean(v)) for k, v in trials.items()}
        by_group: dict[str, list[float]] = defaultdict(list)
        for k, v in per_pair.items():
            by_group[groups[k]].append(v)
        result = {"split": ",".join(sorted({p.split for p in items})), "num_pairs": len(per_pair),
                  "num_trials": len(items), "num_voices": len({p.voice for p in items})}
        if task == "swuggy":
            banded = {g: v for g, v in by_group.items() if g}
            in_vocab = [x for g, v in banded.items() if g != "oov" for x in v]
            result["accuracy"] = {
                "all": _band_accuracy([x for v in banded.values() for x in v])["accuracy"],
                "in_vocab": _band_accuracy(in_vocab)["accuracy"],
                "oov": _band_accuracy(banded.get("oov", []))["accuracy"],
            }
            order = ["oov", "1-5", "6-20", "21-100", ">100"]
            result["by_group"] = {g: _band_accuracy(banded[g]) for g in order if g in banded}
            unbanded = len(by_group.get("", []))
            if unbanded:
                result["pairs_without_frequency"] = unbanded
        else:
            result["accuracy"] = {"all": float(np.mean(list(per_pair.values())))}
            if any(by_group):
                result["by_group"] = {g: _band_accuracy(v) for g, v in sorted(by_group.items())}
        out[task] = result
    return out


_ZEROSPEECH_DIR = {"swuggy": "lexical", "sblimp": "syntactic", "sstorycloze": "sstorycloze",
                   "tstorycloze": "tstorycloze"}


def write_zerospeech(scores_dir: str | Path, pairs: list[Pair], scores: dict[str, float]) -> list[Path]:
    """`<dir>/<lexical|syntactic|sstorycloze|tstorycloze>/<split>.txt`: one `name score` line per wav.

    The sLM21 files are the ZeroSpeech 2021 submission format (`zrc benchmarks:run sLM21 <dir>` or
    zerospeech2021's evaluate scores them); score = this run's log-likelihood (higher = likelier).
    """
    scores_dir = Path(scores_dir)
    lines: dict[Path, dict[str, float]] = defaultdict(dict)
    for p in pairs:
        target = scores_dir / _ZEROSPEECH_DIR[p.task] / f"{p.split or 'all'}.txt"
        for wav in (p.pos, p.neg):
            name = Path(wav).stem
            previous = lines[target].get(name)
            if previous is not None and previous != scores[wav]:
                raise UserError(f"two different wavs named {name} in {p.task}; cannot write {target}")
            lines[target][name] = scores[wav]
    for target, entries in lines.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(f"{name} {score!r}\n" for name, score in sorted(entries.items())))
    return sorted(lines)


def format_table(results: dict[str, dict], scoring: Scoring) -> str:
    rows = [("task", "variant", "accuracy", "pairs")]
    for task, r in results.items():
        groups = r.get("by_group", {})
        for variant, acc in r["accuracy"].items():
            if task != "swuggy":
                n = r["num_pairs"]
            elif variant == "all":
                n = sum(v["n"] for v in groups.values())
            elif variant == "oov":
                n = groups.get("oov", {}).get("n", 0)
            else:
                n = sum(v["n"] for g, v in groups.items() if g != "oov")
            rows.append((task, variant, _pct(acc), str(n)))
        if task != "swuggy":
            for g, v in r.get("by_group", {}).items():
                rows.append((task, f"{g}", _pct(v["accuracy"]), str(v["n"])))
        else:
            for g, v in r.get("by_group", {}).items():
                rows.append((task, f"band {g}", _pct(v["accuracy"]), str(v["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"paper metrics - scoring: {scoring.describe()}"]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{100 * x:.2f}%"


# ----------------------------------------------------------------------------------------------
# The pipeline


class PaperDataError(UserError):
    """Paper-metric inputs that cannot be used; the message names them."""


def parse_paper_data(items: list[str]) -> list[tuple[str | None, str]]:
    """[(task or None, path)] of `--paper_data task=PATH[,task=PATH...]` items (a .jsonl may omit task=)."""
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
            raise PaperDataError(f"--paper_data {item}: {path} does not exist")
        if task is None and not path.endswith(".jsonl"):
            raise PaperDataError(f"--paper_data {item}: a layout directory needs its task (swuggy=DIR, ...)")
        out.append((task, path))
    if not out:
        raise PaperDataError("--eval_type paper_metrics needs --paper_data task=PATH (see docs/eval.md)")
    return out


def collect_pairs(specs, split: str | None, max_pairs: int) -> tuple[list[Pair], dict[str, str]]:
    """The pairs of every (task, path) (the first `max_pairs` of each task if set), and where each task came from."""
    pairs, sources = [], {}
    for task, path in specs:
        if path.endswith(".jsonl"):
            rows = read_manifest(path)
            if task is not None:
                rows = [p for p in rows if p.task == task]
                if not rows:
                    raise PaperDataError(f"--paper_data {task}={path}: the manifest has no {task} rows")
        else:
            default_split = "dev" if task in ("swuggy", "sblimp") else "test"
            rows = pairs_from_layout(path, task, split or default_split)
        for t in sorted({p.task for p in rows}):
            if t in sources:
                raise PaperDataError(f"--paper_data: task {t} given twice ({sources[t]} and {path})")
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


def score_pairs(model, pairs: list[Pair], sources: dict, scoring: Scoring, *, mimi_weight: str,
                codes_cache: str | None, mimi_device: str | None, batch_size: int, length_bucket: int,
                scores_dir: Path | None, log=print) -> dict:
    """The paper metrics of `model` on `pairs`: Mimi codes of every wav (cached), scores of every
    sequence, pairwise accuracies; ZeroSpeech-format score files and the manifests in `scores_dir`;
    `log` takes the progress lines and the table."""
    cfg = model.cfg
    if length_bucket < 1:
        raise PaperDataError(f"--length_bucket={length_bucket} must be >= 1")
    bucket = length_bucket
    if cfg.ttt_layers and not cfg.ttt_causal:
        bucket = 1  # bidirectional TTT mini-batches see right padding: score at exact lengths
        log("note: ttt.causal=false: scoring each length unpadded (one compile per distinct length)")
    wavs = list(dict.fromkeys(w for p in pairs for w in (p.pos, p.neg)))
    cache = CodeCache(mimi_weight, codes_cache, batch_size=batch_size, device=mimi_device)
    tic = time.perf_counter()
    try:
        encoded = cache.codes(wavs, with_silence=scoring.user_stream == "silence")
    except (FileNotFoundError, ValueError) as e:
        raise PaperDataError(f"paper metrics: {e}") from None
    log(f"Mimi codes of {len(wavs)} wavs: {cache.hits} cached, {cache.encoded} encoded "
          f"({time.perf_counter() - tic:.1f} s; cache {cache.cache_dir})")
    top = max(int(c.max()) for c, _ in encoded.values())
    if top >= cfg.card:
        raise PaperDataError(f"paper metrics: Mimi codes go up to {top} but the model's audio vocabulary is "
                             f"card={cfg.card}; this checkpoint cannot score Mimi audio")
    sequences = []
    silences: dict[int, np.ndarray] = {}
    for w in wavs:
        codes, samples = encoded[w]
        silence = None
        if scoring.user_stream == "silence":
            if samples not in silences:
                silences[samples] = cache.silence(samples)
            silence = silences[samples]
        sequences.append(build_sequence(codes, silence, scoring, cfg.n_q))

    token_ce = make_token_ce_fn(cfg)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, c, n: token_ce(nnx.merge(graphdef, s), c, n))
    checked: set = set()

    def run_batch(codes, lengths):
        shape = codes.shape
        if shape not in checked:
            fit.check_batch(cfg, shape[0], shape[2])
            checked.add(shape)
        try:
            return jax.device_get(fn(state, jnp.asarray(codes), jnp.asarray(lengths)))
        except jax.errors.JaxRuntimeError as e:  # compile or run
            fit.raise_if_oom(e, fit.BatchTooLarge(fit.batch_oom_message(shape[0], shape[2])))
            raise

    tic = time.perf_counter()
    values = score_sequences(run_batch, sequences, scoring.codebook_weights(cfg.dep_q), norm=scoring.norm,
                             batch_size=batch_size, bucket=bucket, num_codebooks=cfg.num_codebooks)
    if not np.all(np.isfinite(values)):
        bad = [w for w, v in zip(wavs, values) if not np.isfinite(v)]
        raise PaperDataError(f"paper metrics: {len(bad)} wavs got no score (too short to have a scored "
                             f"token?), e.g. {bad[0]}")
    scores = dict(zip(wavs, values.tolist()))
    results = aggregate(pairs, scores)
    log(format_table(results, scoring))
    out = {"scoring": scoring.to_json(), "tasks": results, "sources": sources, "num_wavs": len(wavs),
           "length_bucket": bucket, "scoring_seconds": time.perf_counter() - tic}
    if scores_dir is not None:
        files = write_zerospeech(scores_dir, pairs, scores)
        for task in sorted({p.task for p in pairs}):
            write_manifest(scores_dir / "manifests" / f"{task}.jsonl", [p for p in pairs if p.task == task])
        out["scores_files"] = [str(f) for f in files]
        out["manifests"] = str(scores_dir / "manifests")
        log(f"wrote ZeroSpeech-format scores and the manifests used to {scores_dir}")
    else:
        log("note: pass --scores_dir or --output_json to write the ZeroSpeech-format score files")
    return out
