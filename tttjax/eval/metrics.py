"""Standard metrics (DESIGN.md section 8): token-weighted over the whole eval set, natural log.

Batches are reduced to sums (`loss_terms`) on device and added up on the host, so the result is
a mean over tokens, not a mean of batch means.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from tttjax.train.loss import loss_terms


def make_terms_fn(cfg, *, text_padding_weight: float, first_codebook_weight_multiplier: float):
    """model, codes -> loss_terms sums (jit it with the model's graph)."""
    pad_ids = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)

    def terms(model, codes):
        return loss_terms(model(codes), codes, dep_q=cfg.dep_q, text_padding_ids=pad_ids,
                          text_padding_weight=text_padding_weight,
                          first_codebook_weight_multiplier=first_codebook_weight_multiplier)

    return terms


def accumulate(term_batches: Iterable[dict]) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for terms in term_batches:
        for k, v in terms.items():
            total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
    if not total:
        raise ValueError("evaluation saw no batches")
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
    out["train_objective"] = (_ce(total["text_weighted_sum"], total["text_weight"])
                              + _ce(total["audio_weighted_sum"], total["audio_weight"]))
    out["text_tokens"] = float(total["text_count"])
    out["audio_tokens"] = float(audio_count.sum())
    return out
