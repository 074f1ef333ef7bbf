"""python -m tttjax.verify on a real (tiny) TTT training run, on tampered copies, and from the eval CLI."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_train import micro_config

from tttjax.eval import evaluators
from tttjax.eval.__main__ import main as eval_main
from tttjax.train.loop import Trainer
from tttjax.verify import main as verify_main
from tttjax.weights.safetensors_io import load as read_safetensors

TTT = "transformer.layers.1.seq_modeling_block"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 steps of a TTT + LoRA run (save_adapters true): checkpoint_000002 with consolidated/lora.safetensors."""
    root = tmp_path_factory.mktemp("verify")
    config = micro_config(root / "run", max_steps=2, ckpt_freq=0)
    assert config.save_adapters and config.ttt.enable
    Trainer(config).run()
    step = root / "run" / "checkpoints" / "checkpoint_000002"
    assert (step / "consolidated" / "lora.safetensors").is_file()
    return root, step


def tampered(run, tmp_path, edit):
    root, _ = run
    shutil.copytree(root / "run", tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / "checkpoint_000002"
    edit(step)
    return step


def test_verify_passes_on_a_real_run(run, capsys, tmp_path):
    _, step = run
    assert verify_main(["--checkpoint_dir", str(step), "--output_json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "OK: every TTT tensor is present, loads, and matches" in out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] and report["ttt_layers"] == [1] and report["checked_tensors"] == 19
    # The per-layer count equals the TTT tensors' sizes in the exported file (dim 32, 2 heads).
    exported = read_safetensors(step / "consolidated" / "lora.safetensors")
    ttt_sizes = sum(v.size for k, v in exported.items() if k.startswith(TTT))
    assert report["params_per_layer"] == {"1": ttt_sizes} and ttt_sizes == 8706


def test_verify_names_what_is_missing_or_different(run, tmp_path, capsys):
    def edit(step):
        path = step / "consolidated" / "lora.safetensors"
        tensors = read_safetensors(path)
        w1 = tensors[f"{TTT}.ttt_layer.ttt.W1"].copy()
        w1[0, 0, 0] += 1  # one bf16 value
        tensors[f"{TTT}.ttt_layer.ttt.W1"] = w1
        del tensors[f"{TTT}.forward_ssm_gating.gating_alpha"]
        save_file(tensors, str(path), metadata={"format": "pt"})
        config = json.loads((step / "consolidated" / "config.json").read_text())
        config["ttt"]["mini_batch_size"] = 8
        (step / "consolidated" / "config.json").write_text(json.dumps(config))

    step = tampered(run, tmp_path, edit)
    assert verify_main(["--checkpoint_dir", str(step)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 3 problem(s)" in out
    assert f"missing: {TTT}.forward_ssm_gating.gating_alpha (not in lora.safetensors)" in out
    assert f"different: {TTT}.ttt_layer.ttt.W1: 1 of 2048 values differ at the file's precision (bfloat16)" in out
    assert "ttt.mini_batch_size: 8 vs checkpoint 4" in out

    # The eval CLI runs the verification for TTT checkpoints and stops; --no_ttt_verify skips it.
    assert eval_main(["--checkpoint_dir", str(step), "--batch_size", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TTT verification of") and "failed (3 problems" in err and "\n" not in err
    assert eval_main(["--checkpoint_dir", str(step), "--batch_size", "4", "--no_ttt_verify", "--max_batches", "1"]) == 0


def test_verify_reads_stored_tensors_before_loading(tmp_path, capsys):
    """An imported dir whose config.json announces a TTT layer its params do not hold."""
    import torch_reference as ref

    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    save_model(tmp_path / "ckpt", create_model(from_lm_kwargs(ref.lm_kwargs())))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["ttt"] = {"enable": True, "layers": "0", "mini_batch_size": 4}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    assert verify_main(["--checkpoint_dir", str(tmp_path / "ckpt")]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 19 problem(s)" in out
    assert ("missing: transformer.layers.0.seq_modeling_block.ttt_layer.ttt.W1 (checkpoint param ttt.ttt.W1)"
            in out)
    assert verify_main(["--checkpoint_dir", str(tmp_path / "nope")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().out


def test_eval_cli_on_the_step_dir(run, tmp_path, capsys):
    """Defaults from the run's args.yaml: data.eval_data, duration_sec, loss weights; verify runs first."""
    _, step = run
    out = tmp_path / "e.json"
    assert eval_main(["--checkpoint_dir", str(step), "--batch_size", "4", "--output_json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("OK: every TTT tensor") < printed.index("train_objective")
    result = json.loads(out.read_text())
    assert result["ttt_verify"]["ok"] and result["loss_weights_source"].endswith("args.yaml")
    std = result["standard"]
    assert std["data"] == "synthetic:8" and std["frames"] == 16 and std["metrics"]["num_sequences"] == 8
    m = std["metrics"]
    assert m["audio_tokens"] == sum(m[f"audio_tokens_q{q}"] for q in range(8))
    assert np.isfinite(m["train_objective"]) and m["text_ce_nonpad"] > 0
    # The same numbers as the training loop's own evaluation of that checkpoint (evals.standard), and
    # as `--evals standard`, which runs that evaluation from the run's config.
    root, _ = run
    trainer = Trainer(micro_config(root / "run", max_steps=2, ckpt_freq=0))
    assert trainer.restore() == 2
    [standard], _ = evaluators.build(trainer.config, trainer.cfg, trainer.mesh, tmp_path, only=("standard",))
    theirs = standard(trainer.model(), step=2)
    trainer.manager.close()
    assert eval_main(["--checkpoint_dir", str(step), "--evals", "standard", "--no_ttt_verify",
                      "--output_json", str(out)]) == 0
    configured = json.loads(out.read_text())["evals"]["standard"]
    for key in ("text_ce", "text_ce_nonpad", "audio_ce", "audio_ce_semantic", "train_objective"):
        np.testing.assert_allclose(m[key], theirs[key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(m[key], configured[key], rtol=1e-5, err_msg=key)


def test_an_old_run_dir_evaluates_and_resumes(run, tmp_path, capsys):
    """A run dir whose args.yaml predates the evals.* keys and model.attention_impl, and spells the
    evaluation moshi-finetune's way (eval_freq, data.eval_data): evaluated and resumed as it is."""
    import yaml

    from tttjax.main import main as train_main

    step = tampered(run, tmp_path, lambda step: None)
    args = step.parents[1] / "args.yaml"
    data = yaml.safe_load(args.read_text())
    standard = data.pop("evals")["standard"]
    del data["model"]["attention_impl"], data["checkpoint"]["allow_data_change"]
    data.update(eval_freq=standard["freq"], eval_batches=standard["batches"])
    data["data"]["eval_data"] = standard["data"]
    args.write_text(yaml.safe_dump(data))
    assert eval_main(["--checkpoint_dir", str(step), "--no_ttt_verify", "--output_json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["standard"]["data"] == standard["data"]
    capsys.readouterr()
    assert train_main([f"--config={args}", "--config.max_steps=3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finished: steps 2->3 of 3")
