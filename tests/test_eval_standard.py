"""python -m tttjax.eval --eval_type standard: parity with the moshi PyTorch package, and clear refusals."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_reference as ref

from conversion.from_pytorch import main as from_pytorch_main
from tttjax.eval.__main__ import main as eval_main

RTOL = 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random moshi LMModel, its import, and codes [3, 17, 12] with pads, end-pads and -1 tails."""
    tmp = tmp_path_factory.mktemp("std")
    kwargs = ref.lm_kwargs()
    lm = ref.build_lm(kwargs, seed=5)
    weights = ref.save_safetensors(tmp / "w.safetensors", ref.state_dict_numpy(lm))
    config = ref.save_config(tmp / "config.json", kwargs)
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(tmp / "ckpt")]) == 0
    codes = ref.random_codes(kwargs, batch=3, frames=12, seed=3, pad_tail=4)
    rng = np.random.default_rng(0)
    text = codes[:, 0]
    text[rng.random(text.shape) < 0.3] = 3  # text pads
    text[rng.random(text.shape) < 0.1] = 0  # end-of-padding
    codes[0, 4, 5] = -1  # a missing audio token mid-sequence
    np.save(tmp / "codes.npy", codes)
    return {"dir": tmp / "ckpt", "codes_file": tmp / "codes.npy", "codes": codes, "lm": lm, "tmp": tmp,
            "kwargs": kwargs}


def torch_metrics(lm, codes, *, first_codebook_weight_multiplier, text_padding_weight):
    """The same metrics computed independently from moshi's logits with torch's cross_entropy."""
    with torch.no_grad():
        out = lm(torch.from_numpy(codes))
    target = torch.from_numpy(codes)
    tmask = out.text_mask[:, 0]
    tt = target[:, 0][tmask]
    text_ce = F.cross_entropy(out.text_logits[:, 0][tmask].double(), tt, reduction="none")
    pad = (tt == 3) | (tt == 0)
    per_q = []
    for q in range(out.logits.shape[1]):
        m = out.mask[:, q]
        per_q.append(F.cross_entropy(out.logits[:, q][m].double(), target[:, 1 + q][m], reduction="none"))
    audio = torch.cat(per_q)
    res = {"text_ce": text_ce.mean(), "text_ce_nonpad": text_ce[~pad].mean(), "audio_ce": audio.mean(),
           "audio_ce_semantic": per_q[0].mean(), "audio_ce_acoustic": torch.cat(per_q[1:]).mean()}
    res.update({f"audio_ce_q{q}": c.mean() for q, c in enumerate(per_q)})
    res = {k: float(v) for k, v in res.items()}
    res.update({f"{k}_ppl": float(np.exp(v)) for k, v in list(res.items())})
    tw = torch.where(pad, text_padding_weight, 1.0).double()
    aw = torch.cat([torch.full_like(per_q[0], first_codebook_weight_multiplier)] +
                   [torch.ones_like(c) for c in per_q[1:]])
    res["train_objective"] = float((text_ce * tw).sum() / tw.sum() + (audio * aw).sum() / aw.sum())
    res["text_tokens"] = float(tmask.sum())
    res["audio_tokens"] = float(out.mask.sum())
    return res


def assert_matches(ours: dict, theirs: dict):
    for key, want in theirs.items():
        np.testing.assert_allclose(ours[key], want, rtol=RTOL, err_msg=key)


def test_standard_metrics_equal_moshi_pytorch(imported, tmp_path, capsys):
    out = tmp_path / "m.json"
    # batch 2 over 3 rows: the second batch is padded with a -1 row; token-weighted, not a mean of batches.
    rc = eval_main(["--checkpoint_dir", str(imported["dir"]), "--data", str(imported["codes_file"]),
                    "--eval_type", "standard", "--batch_size", "2", "--output_json", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "text (non-pad" in printed and "audio semantic (q0)" in printed and "train_objective" in printed
    result = json.loads(out.read_text())
    assert result["loss_weights_source"] == "configs/base.py defaults"
    std = result["standard"]
    assert std["loss_weights"] == {"first_codebook_weight_multiplier": 100.0, "text_padding_weight": 0.5}
    assert std["metrics"]["num_sequences"] == 3 and std["rows"] == 3
    want = torch_metrics(imported["lm"], imported["codes"], first_codebook_weight_multiplier=100.0,
                         text_padding_weight=0.5)
    assert 0 < want["text_tokens"] < 36 and want["audio_tokens"] < 3 * 8 * 12
    assert_matches(std["metrics"], want)

    # --config supplies the loss weights (a config describing the same model).
    cfg_file = tmp_path / "weights_config.py"
    cfg_file.write_text(
        "from configs import base\n"
        "def get_config():\n"
        "    c = base.get_config()\n"
        f"    c.model.update({imported['kwargs']!r})\n"
        "    c.lora.enable = False\n"
        "    c.first_codebook_weight_multiplier = 100.0\n"
        "    return c\n")
    rc = eval_main(["--checkpoint_dir", str(imported["dir"]), "--data", str(imported["codes_file"]),
                    f"--config={cfg_file}", "--config.text_padding_weight=0.25", "--batch_size", "3",
                    "--output_json", str(out)])
    assert rc == 0, capsys.readouterr().err
    std = json.loads(out.read_text())["standard"]
    assert std["loss_weights"] == {"first_codebook_weight_multiplier": 100.0, "text_padding_weight": 0.25}
    want = torch_metrics(imported["lm"], imported["codes"], first_codebook_weight_multiplier=100.0,
                         text_padding_weight=0.25)
    assert_matches(std["metrics"], want)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_clear_one_line_errors(imported, tmp_path, capsys, monkeypatch):
    base = ["--data", str(imported["codes_file"])]
    assert eval_main(["--checkpoint_dir", str(tmp_path / "nope")] + base) == 1
    assert "no such checkpoint directory" in _error(capsys)

    assert eval_main(["--checkpoint_dir", str(tmp_path)] + base) == 1
    assert "neither a training step dir" in _error(capsys)

    ckpt = ["--checkpoint_dir", str(imported["dir"])]
    assert eval_main(ckpt + base + ["--config=configs/does_not_exist.py"]) == 2  # a config error is a usage error
    assert "no such file" in _error(capsys)

    # the tiny config describes another model than the checkpoint
    assert eval_main(ckpt + base + ["--config=configs/tiny.py"]) == 1
    err = _error(capsys)
    assert "describes another model" in err and "dim: saved 64 vs config 128" in err

    assert eval_main(ckpt + base + ["--config=configs/tiny.py", "--config.no_such_key=1"]) == 2
    assert "no_such_key" in _error(capsys)

    assert eval_main(ckpt + ["--data", str(tmp_path / "missing.npy")]) == 1
    assert "missing.npy not found" in _error(capsys)

    # a batch size that cannot fit: refused before running, naming the flag and what would fit.
    from tttjax.analysis import memory
    from tttjax.weights.loader import open_weights

    one_row = memory.estimate_memory(open_weights(imported["dir"]).cfg, batch_size=1, num_frames=12,
                                     training=False).activations
    monkeypatch.setattr(memory, "free_bytes", lambda: 2 * one_row)
    assert eval_main(ckpt + base + ["--batch_size", "3"]) == 1
    err = _error(capsys)
    assert "--batch_size=3 with 12-frame sequences needs about" in err and "try --batch_size=1" in err
    monkeypatch.undo()

    assert eval_main(ckpt + ["--eval_type", "paper_metrics"]) == 1
    assert "--paper_data" in _error(capsys)


def test_eval_length_of_a_prepared_dir(tmp_path):
    """Without --duration_sec, eval reads the example length from metadata.json: the cut length, or
    with whole files (prepare --duration_sec 0) the longest example."""
    import argparse

    from tttjax.eval.__main__ import EvalError, _num_frames

    args = argparse.Namespace(duration_sec=None)
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"inputs": {"duration_sec": 100.0}, "max_frames_per_example": 1250}))
    assert _num_frames(args, str(tmp_path), None) == 1250
    meta.write_text(json.dumps({"inputs": {"duration_sec": 0}, "max_frames_per_example": 22_500}))
    assert _num_frames(args, str(tmp_path), None) == 22_500
    meta.write_text(json.dumps({"inputs": {}}))
    with pytest.raises(EvalError, match="pass --duration_sec"):
        _num_frames(args, str(tmp_path), None)
