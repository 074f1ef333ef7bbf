"""Standard metrics (docs/contract.md §8): token-weighted over the whole eval set, natural log.

Batches are reduced to sums (`loss_terms`) on device and added up on the host, so the result is
a mean over tokens, not a mean of batch means.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from tttjax.errors import UserError


def accumulate(term_batches: Iterable[dict]) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for terms in term_batches:
        for k, v in terms.items():
            total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
    if not total:
        raise UserError("evaluation saw no batches")
    return total


def _ce(total: float, count: float) -> float:
    return float(total / count) if count > 0 else float("nan")


def standard_metrics(total: dict[str, np.ndarray]) -> dict[str, float]:
    """text_ce, text_ce_nonpad, audio_ce_q*, audio_ce, audio_ce_semantic/acoustic, *_ppl, train_objective."""
    audio_sum, audio_count = total["audio_ce_sum"], total["audio_count"]
    out = {
        "text_ce": _ce(total["text_ce_sum"], total["text_count"]),
        "text_ce_nonpad": _ce(total["text_nonpad_ce_sum"], total["text_nonpad_count"]),
        **{f"audio_ce_q{q}": _ce(audio_sum[q], audio_count[q]) for q in range(len(audio_sum))},
        "audio_ce": _ce(audio_sum.sum(), audio_count.sum()),
        "audio_ce_semantic": _ce(audio_sum[0], audio_count[0]),
        "audio_ce_acoustic": _ce(audio_sum[1:].sum(), audio_count[1:].sum()),
    }
    out.update({f"{k}_ppl": math.exp(v) if math.isfinite(v) else float("nan") for k, v in list(out.items())})
    out["train_objective_text"] = _ce(total["text_weighted_sum"], total["text_weight"])
    out["train_objective_audio"] = _ce(total["audio_weighted_sum"], total["audio_weight"])
    out["train_objective"] = out["train_objective_text"] + out["train_objective_audio"]
    out["text_tokens"] = float(total["text_count"])
    out["audio_tokens"] = float(audio_count.sum())
    return out


# (label, ce key, token-count key or None) of the printed table, in order.
_TABLE_ROWS = [("text (all targets)", "text_ce", "text_tokens"),
               ("text (non-pad: targets not 3/0)", "text_ce_nonpad", "text_nonpad_tokens"),
               ("audio (8 Moshi codebooks)", "audio_ce", "audio_tokens"),
               ("audio semantic (q0)", "audio_ce_semantic", "audio_tokens_q0"),
               ("audio acoustic (q1..q7)", "audio_ce_acoustic", "audio_acoustic_tokens")]


def with_counts(metrics: dict[str, float], total: dict[str, np.ndarray]) -> dict[str, float]:
    """metrics + the token counts behind each CE (for the table and the JSON)."""
    counts = np.asarray(total["audio_count"], np.float64)
    out = dict(metrics)
    out["text_nonpad_tokens"] = float(total["text_nonpad_count"])
    out.update({f"audio_tokens_q{q}": float(c) for q, c in enumerate(counts)})
    out["audio_acoustic_tokens"] = float(counts[1:].sum())
    return out


def format_table(metrics: dict[str, float], *, first_codebook_weight_multiplier: float,
                 text_padding_weight: float) -> str:
    """The standard metrics as a fixed-width table (natural-log CE, ppl = exp(CE), token counts)."""
    num_q = sum(1 for k in metrics if k.startswith("audio_ce_q") and not k.endswith("_ppl"))
    rows = [(label, ce, tokens) for label, ce, tokens in _TABLE_ROWS]
    rows += [(f"audio q{q}", f"audio_ce_q{q}", f"audio_tokens_q{q}") for q in range(num_q)]
    lines = [f"{'stream':34s} {'CE (nats)':>10s} {'ppl':>12s} {'tokens':>10s}"]
    for label, ce, tokens in rows:
        count = metrics.get(tokens)
        lines.append(f"{label:34s} {metrics[ce]:10.4f} {metrics[ce + '_ppl']:12.4f} "
                     f"{'' if count is None else int(count):>10}")
    lines.append(f"train_objective = {metrics['train_objective']:.4f} (text {metrics['train_objective_text']:.4f} "
                 f"+ audio {metrics['train_objective_audio']:.4f}; weighted means, "
                 f"first_codebook_weight_multiplier={first_codebook_weight_multiplier:g}, "
                 f"text_padding_weight={text_padding_weight:g})")
    return "\n".join(lines)
