"""Long-context curve (tttjax.eval.long_context): per-frame CE through the chunked forward.

The curve of a model with causal TTT layers computed in chunks (carried KV cache and TTT state,
chunks misaligned with the mini-batch of 4 and with context 6 < T) equals the one from a single
full-sequence forward: max |diff| < 1e-4 nats per frame (fp32; observed ~5e-7), identical counts.
"""

import json

import numpy as np
import pytest
import torch_reference as ref

from tttjax.eval import long_context
from tttjax.model.config import from_lm_kwargs
from tttjax.model.moshi import create_model

KWARGS = ref.lm_kwargs(context=6, num_layers=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tttjax.checkpoint.model_dir import save_model

    cfg = from_lm_kwargs(KWARGS, ttt_layers=(0, 2), ttt_mini_batch_size=4, ttt_base_lr=10.0,
                         ttt_initial_gating_alpha=1.0)
    path = tmp_path_factory.mktemp("lc") / "ckpt"
    save_model(path, create_model(cfg, seed=0))
    return path


def make_codes():
    long = ref.random_codes(KWARGS, batch=2, frames=23, seed=3)  # the last 3 frames of sample 1 are -1
    long[:, 0, 5:9] = 3  # some text padding, so text_nonpad differs from text
    return [long, ref.random_codes(KWARGS, batch=2, frames=13, seed=4, pad_tail=0)]


def test_chunked_curve_equals_single_pass(checkpoint):
    from tttjax.weights.loader import load_model

    model = load_model(checkpoint)
    codes = make_codes()
    chunked = long_context.chunked_curve(model, codes, chunk_size=5)
    single = long_context.single_pass_curve(model, codes)
    assert chunked.frames == single.frames == 23
    for name in long_context.stream_names(model.cfg.dep_q):
        np.testing.assert_array_equal(chunked.counts[name], single.counts[name])
        seen = single.counts[name] > 0
        assert seen.sum() > 10
        diff = np.abs(chunked.mean(name) - single.mean(name))[seen]
        assert diff.max() < 1e-4, (name, diff.max())
    # Counts: frames 13..22 only exist in the long file, whose sample 1 ends at frame 20.
    assert single.counts["audio_semantic"][0] == 4 and single.counts["audio_semantic"][15] == 2
    assert single.counts["audio_semantic"][21] == 1
    assert single.counts["text_nonpad"][6] == 2  # frame 6 is padding in the long file
    rows = long_context.buckets_table(chunked, (0, 10, 20))
    assert [r["bucket"] for r in rows] == ["[0, 10)", "[10, 20)", "[20, end)"]
    total = sum(r["audio_ce"] * r["audio_tokens"] for r in rows) / sum(r["audio_tokens"] for r in rows)
    assert total == pytest.approx(chunked.sums["audio"].sum() / chunked.counts["audio"].sum())


def test_cli_writes_curve_and_table(checkpoint, tmp_path, capsys):
    codes = make_codes()
    paths = []
    for i, c in enumerate(codes):
        paths.append(str(tmp_path / f"c{i}.npy"))
        np.save(paths[-1], c)
    out = tmp_path / "out"
    args = ["--checkpoint_dir", str(checkpoint), "--codes", *paths, "--out_dir", str(out), "--buckets", "0,10,20"]
    assert long_context.main(args + ["--chunk_size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "[10, 20)" in printed and "audio_semantic_ce" in printed
    lines = (out / "long_context_curve.csv").read_text().splitlines()
    assert lines[0].startswith("frame,text_ce,text_count,text_nonpad_ce") and len(lines) == 24
    result = json.loads((out / "long_context.json").read_text())
    assert result["frames"] == 23 and len(result["buckets"]) == 3 and result["chunk_size"] == 5
    assert set(result["slope_vs_ln_frame"]) == set(long_context.TABLE_STREAMS)
    png = (out / "long_context_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # A non-causal TTT model cannot be chunked: refused with the reason.
    from tttjax.checkpoint.model_dir import save_model

    bad = tmp_path / "noncausal"
    save_model(bad, create_model(from_lm_kwargs(KWARGS, ttt_layers=(1,), ttt_causal=False), seed=0))
    assert long_context.main(["--checkpoint_dir", str(bad), "--codes", paths[1], "--out_dir", str(out)]) == 1
    assert "ttt.causal=False" in capsys.readouterr().err
