"""First contact (issue 18): the guide's workflows on a fresh clone.

One-line errors naming the culprit, relative paths in every CLI, YAML configs (a run's args.yaml,
moshi-finetune's TrainArgs), one source of defaults, the run's log lines, real tensorflow-datasets
and wandb (offline), and the documented offline paper-metrics path. One small training run (card
2048, from a TFDS dataset written by `prepare --format tfds`, wandb offline) serves most tests.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tttjax.config import reader
from tttjax.data import offline
from tttjax.errors import ConfigError
from tttjax.main import main as train_main

REPO = Path(__file__).resolve().parents[1]
FRAMES = 16  # duration_sec 1.28 (TINY_SHAPE)


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def random_codes(rows: int, frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 24, size=(rows, 17, frames)).astype(np.int32)  # < text_card


# -- 4. YAML configs: a run's args.yaml, moshi-finetune's TrainArgs ------------------------------
# moshi-finetune's example/moshi_7B.yaml, key for key, with local paths substituted.
MOSHI_FINETUNE_EXAMPLE = """
data:
  eval_data: ''
  shuffle: true
  train_data: {data}
moshi_paths:
  hf_repo_id: null
full_finetuning: false
lora:
  enable: true
  rank: 128
  scaling: 2.
  ft_embed: false
first_codebook_weight_multiplier: 100.
text_padding_weight: .5
duration_sec: 100
batch_size: 16
max_steps: 2000
gradient_checkpointing: true
optim:
  lr: 2e-6
  weight_decay: 0.1
  pct_start: 0.05
seed: 0
log_freq: 1
eval_freq: 100
do_eval: false
do_ckpt: true
ckpt_freq: 100
save_adapters: true
run_dir: {run_dir}
wandb:
  project: ''
  offline: false
  key: ''
  run_name: ''
"""

TINY_SHAPE = ["--config.model.dim=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
              "--config.model.card=2048", "--config.model.text_card=24", "--config.model.depformer_dim=16",
              "--config.model.depformer_num_layers=1", "--config.model.depformer_num_heads=2",
              "--config.model.depformer_dim_feedforward=64", "--config.lora.rank=2", "--config.batch_size=2",
              "--config.duration_sec=1.28", "--config.max_steps=2", "--config.ckpt_freq=1", "--config.remat=none",
              "--config.param_dtype=float32", "--config.dtype=float32", "--config.ttt.enable=true",
              "--config.ttt.layers=1", "--config.ttt.mini_batch_size=4"]



def train_example(tmp: Path, run_dir: Path, *extra: str) -> int:
    example = tmp / "moshi_7B.yaml"
    example.write_text(MOSHI_FINETUNE_EXAMPLE.format(data="tfds:tiny_codes", run_dir=run_dir))
    return train_main([f"--config={example}", *TINY_SHAPE, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepared codes -> `prepare --format tfds` -> 2 training steps of moshi-finetune's example YAML
    (tiny shape by overrides) on tfds:tiny_codes, with wandb offline."""
    from tttjax.data.prepare import main as prepare_main

    tmp = tmp_path_factory.mktemp("first_contact")
    np.save(tmp / "codes.npy", random_codes(12, 20, seed=0))
    prepare_main(["--codes", str(tmp / "codes.npy"), "--out", str(tmp / "prepared"), "--text_card", "24",
                  "--format", "tfds", "--tfds_name", "tiny_codes"])
    env = {"TFDS_DATA_DIR": str(tmp / "prepared" / "tfds"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        rc = train_example(tmp, tmp / "runs" / "micro", "--config.wandb.project=tttjax-test",
                           "--config.wandb.offline=true")
    assert rc == 0
    return tmp


# -- 1. init_state_dir refuses another architecture by name ---------------------------------------
@pytest.mark.parametrize("change, message", [("--config.ttt.layers=0", "ttt_layers: saved [1] vs config [0]"),
                                             ("--config.lora.rank=4", "lora_rank: saved 2 vs config 4")])
def test_init_state_dir_refuses_another_architecture(run, tmp_path, capsys, change, message):
    step = run / "runs" / "micro" / "checkpoints" / "checkpoint_000002"
    rc = train_example(tmp_path, tmp_path / "new", change, f"--config.checkpoint.init_state_dir={step}")
    one_line_error(capsys, rc, message, "checkpoint.init_state_dir=")


# -- 2. one line naming the culprit, non-zero exit ------------------------------------------------
def test_config_errors_are_one_line(tmp_path, capsys, monkeypatch):
    one_line_error(capsys, train_main(["--config=configs/tiny.py", "--config.ckpt_frq=5"]), "did you mean ckpt_freq")
    one_line_error(capsys, train_main([f"--config={tmp_path}/missing.py"]), "missing.py: no such file")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    rc = train_main(["--config=configs/tiny.py", "--config.wandb.project=x"])
    one_line_error(capsys, rc, "wandb.project=x: wandb is not installed", "pip install -e .[wandb]")


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from tttjax.analysis import memory
    from tttjax.train import program

    monkeypatch.setattr(memory, "free_bytes", lambda device=None: 1 << 20)  # CPU: host memory is the limit
    data = "--config.data.train_data=synthetic:8"
    one_line_error(capsys, train_example(tmp_path, tmp_path / "r", data), "available host memory", "batch_size=2",
                   "duration_sec=1.28", "remat=none")
    monkeypatch.undo()

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    monkeypatch.setattr(program.TrainProgram, "step", exhausted)
    rc = train_example(tmp_path, tmp_path / "r2", data, "--config.memory_check=off")
    one_line_error(capsys, rc, "out of memory at step 1", "batch_size=2", "duration_sec=1.28", "remat=none")


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    from tttjax.eval.__main__ import main as eval_main
    from tttjax.forward import main as forward_main

    not_npy = tmp_path / "codes.npy"
    not_npy.write_text("hello")
    step = run / "runs" / "micro" / "checkpoints" / "checkpoint_000002"
    rc = forward_main(["--checkpoint_dir", str(step), "--codes", str(not_npy), "--out", str(tmp_path / "o.npz")])
    err = one_line_error(capsys, rc, f"{not_npy}: not a .npy array file")
    assert "pickle" not in err
    rc = eval_main(["--checkpoint_dir", str(tmp_path / "MISSING")])
    one_line_error(capsys, rc, "MISSING: no such checkpoint directory")
    slurm = subprocess.run([sys.executable, "-m", "launch.slurm", "--help"], cwd=REPO, capture_output=True, text=True)
    assert slurm.returncode == 0 and "job id % 4096" in slurm.stdout, slurm.stderr


# -- 3. relative paths in every CLI, checked before compiling -------------------------------------
def test_relative_checkpoint_dirs(run, tmp_path, monkeypatch, capsys):
    from tttjax.eval.__main__ import main as eval_main
    from tttjax.forward import main as forward_main
    from tttjax.generate import main as generate_main
    from tttjax.verify import main as verify_main

    monkeypatch.chdir(run)
    step = "runs/micro/checkpoints/checkpoint_000002"
    np.save(tmp_path / "codes.npy", random_codes(1, 8, seed=1))
    np.save(tmp_path / "user.npy", random_codes(1, 6, seed=2)[:, 9:])
    assert verify_main(["--checkpoint_dir", step]) == 0
    assert forward_main(["--checkpoint_dir", step, "--codes", str(tmp_path / "codes.npy"),
                         "--out", str(tmp_path / "o.npz")]) == 0
    assert generate_main(["--checkpoint_dir", step, "--user_codes", str(tmp_path / "user.npy"), "--greedy",
                          "--out", str(tmp_path / "g.npy")]) == 0
    # 7. eval through tfds: from the real TFDS dataset
    monkeypatch.setenv("TFDS_DATA_DIR", "prepared/tfds")
    assert eval_main(["--checkpoint_dir", step, "--data", "tfds:tiny_codes", "--batch_size", "4",
                      "--no_ttt_verify", "--output_json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())["standard"]
    assert result["frames"] == FRAMES and np.isfinite(result["metrics"]["train_objective"])


def test_moshi_finetune_example_yaml_trains(run):
    """The fixture trained moshi-finetune's example YAML: its mapping, and args.yaml as a config."""
    example = run / "moshi_7B.yaml"
    config = reader.load(str(example))
    assert (config.remat, config.evals.standard.freq, config.optim.lr, config.lora.rank, config.num_ckpt_keep,
            config.first_codebook_weight_multiplier) == ("full", 0, 2e-6, 128, 3, 100.0)
    overrides = [tuple(a[len("--config."):].split("=", 1)) for a in TINY_SHAPE]
    overrides += [("wandb.project", "tttjax-test"), ("wandb.offline", "true")]
    args = reader.load(str(run / "runs" / "micro" / "args.yaml"))  # a run's own args.yaml is a config too
    assert args.to_dict() == reader.load(str(example), overrides).to_dict()


def test_yaml_mapping_and_refusals(tmp_path, capsys):
    def load(text, overrides=()):
        (tmp_path / "c.yaml").write_text(text)
        return reader.load(str(tmp_path / "c.yaml"), overrides)

    ttt = load("ttt: {enable: true, layers: '1,3', weight_lr_multiplier: 10, alpha_lr_multiplier: 100}\n"
               "lora: null\nmax_norm: 0.5\ngradient_checkpointing: false\nnum_ckpt_keep: null\n"
               "checkpoint: {resume: true, resume_step: 5}")
    assert (ttt.ttt.layers, ttt.optim.ttt_lr_multiplier, ttt.optim.gate_lr_multiplier, ttt.lora.enable,
            ttt.optim.max_norm, ttt.remat, ttt.num_ckpt_keep, ttt.checkpoint.resume,
            ttt.checkpoint.resume_step) == ("1,3", 10.0, 100.0, False, 0.5, "none", None, "auto", 5)
    cli = load("seed: 1", [("checkpoint.resume", "false"), ("num_ckpt_keep", "None")])
    assert (cli.checkpoint.resume, cli.num_ckpt_keep) == ("never", None)
    with pytest.raises(ConfigError, match="hf_repo_id=kyutai/moshiko-pytorch-bf16: hub ids need a local"):
        load("moshi_paths: {hf_repo_id: kyutai/moshiko-pytorch-bf16}")
    with pytest.raises(ConfigError, match=r"c.yaml: ckpt_frq: no such key; did you mean ckpt_freq"):
        load("ckpt_frq: 5")
    with pytest.raises(ConfigError, match="lora.ft_embed=True: not supported"):
        load("lora: {ft_embed: true}")


# -- 5. one source of defaults ---------------------------------------------------------------------
def test_eval_defaults_are_the_projects(tmp_path):
    from configs import base
    from tttjax.eval.__main__ import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS == {k: base.get_config()[k] for k in ("first_codebook_weight_multiplier",
                                                                 "text_padding_weight")}
    assert DEFAULT_WEIGHTS["first_codebook_weight_multiplier"] == 100.0


# -- 6. the run's log, --help, usage lines, the conversion guide ---------------------------------
def test_log_help_usage_and_docs(run, capsys):
    log = (run / "runs" / "micro" / "logs" / "train.log").read_text()
    for step in (1, 2):
        assert f"checkpoint {step} committed: {run}/runs/micro/checkpoints/checkpoint_00000{step} (" in log
    assert "finished: steps 0->2 of 2 in " in log and "last loss " in log and "checkpoints [1, 2] in " in log
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tttjax.main") and "ckpt_freq = 0" in out and "# checkpoint every" in out
    assert train_main(["--config=configs/tiny.py", "--help"]) == 0
    assert "lora.rank = 8" in capsys.readouterr().out
    for module in ("tttjax.forward", "tttjax.generate", "conversion.to_pytorch", "tttjax.eval.long_context"):
        with pytest.raises(SystemExit):
            importlib.import_module(module).main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: python -m {module}"), module
    guide = (REPO / "docs" / "conversion.md").read_text()
    assert "conversion.torch_ttt.load_ttt_moshi" in guide and "stock `get_moshi_lm` rejects the `ttt` key" in guide


# -- 8. wandb for real, offline --------------------------------------------------------------------
def test_wandb_offline_run_lands_in_run_dir(run):
    runs = list((run / "runs" / "micro" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


# -- 9. paper metrics offline, as docs/eval.md documents it ---------------------------------------
def test_paper_metrics_offline_path(run, tmp_path, monkeypatch):
    """A local (random) Mimi, the card-2048 model trained above, a story set built from local wavs."""
    import toydata

    from tttjax.eval.__main__ import main as eval_main

    mimi = offline.save_random_mimi(tmp_path / "mimi.safetensors")
    (tmp_path / "story").mkdir()
    for i, kind in ((0, "correct"), (0, "incorrect"), (1, "correct"), (1, "incorrect")):
        pcm = toydata.speech_like(np.random.default_rng(len(kind) + i), 0.4, sample_rate=16000, channels=1)
        toydata.write_wav(tmp_path / "story" / f"{i}_s_{kind}.wav", pcm, 16000)
    monkeypatch.chdir(run)
    assert eval_main(["--checkpoint_dir", "runs/micro/checkpoints/checkpoint_000002", "--eval_type", "paper_metrics",
                      "--paper_data", f"tstorycloze={tmp_path / 'story'}", "--mimi_weight", str(mimi),
                      "--mimi_device", "cpu", "--no_ttt_verify", "--codes_cache", str(tmp_path / "cache"),
                      "--output_json", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())["paper_metrics"]
    assert "tstorycloze" in json.dumps(result)
