"""The config schema and its one reader: every value checked at load time naming the key, YAML
duplicates refused with both lines, hints that name a key path that exists, and old run dirs
(args.yaml without newer keys) read with today's defaults."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tttjax.config import reader, schema
from tttjax.errors import ConfigError, UserError
from tttjax.main import main as train_main
from tttjax.train.program import build_program

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("optim.b1=1", "optim.b1=1.0: must be in [0, 1)"),
    ("optim.b2=-0.1", "optim.b2=-0.1: must be in [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0: must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.pct_start=1.5", "optim.pct_start=1.5: must be in [0, 1]"),
    ("optim.max_norm=0", "optim.max_norm=0.0: must be > 0"),
    ("log_freq=0", "log_freq=0: must be >= 1"),
    ("batch_size=-4", "batch_size=-4: must be >= 1"),
    ("duration_sec=0", "duration_sec=0.0: must be > 0"),
    ("max_steps=0", "max_steps=0: must be >= 1"),
    ("num_ckpt_keep=0", "num_ckpt_keep=0: must be >= 1"),
    ("ckpt_freq=-1", "ckpt_freq=-1: must be >= 0"),
    ("ttt.mini_batch_size=0", "ttt.mini_batch_size=0: must be >= 1"),
    ("ttt.base_lr=nan", "ttt.base_lr=nan: must be a finite number"),
    ("mesh.fsdp=0", "mesh.fsdp=0: must be -1 (the rest) or >= 1"),
    ("remat=some", "remat='some': expected one of none, full, dots"),
    ("checkpoint.resume=maybe", "checkpoint.resume='maybe': expected one of auto, never"),
    ("memory_check=loud", "memory_check='loud': expected one of error, warn, off"),
    ("model.attention_impl=flash", "model.attention_impl='flash': expected one of"),
    ("first_codebook_weight_multiplier=-1", "first_codebook_weight_multiplier=-1.0: must be >= 0"),
])
def test_every_numeric_and_choice_key_is_checked_at_load(override, needle):
    key, _, text = override.partition("=")
    with pytest.raises(ConfigError) as info:
        reader.load("configs/tiny.py", [(key, text)])
    assert needle in str(info.value)


def test_rules_across_keys():
    with pytest.raises(ConfigError, match="batch_size=8 is not divisible by num_microbatches=3"):
        reader.load("configs/tiny.py", [("num_microbatches", "3")])
    with pytest.raises(UserError, match="no trainable parameters"):  # a training rule: eval configs may have none
        build_program(reader.load("configs/tiny.py", [("lora.enable", "false"), ("ttt.enable", "false")]))
    with pytest.raises(ConfigError, match=r"ttt.layers='7' \(num_layers=4\): layer indices \[7\] out of range"):
        reader.load("configs/tiny.py", [("ttt.layers", "7")])
    assert reader.load("configs/tiny.py", [("num_ckpt_keep", "none")]).num_ckpt_keep is None  # None = keep all


def test_bad_value_exits_2_in_one_line_before_anything_is_built(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = train_main(["--config=configs/tiny.py", f"--config.run_dir={run_dir}", "--config.optim.lr=-1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: optim.lr=-1.0: must be > 0", err
    assert not run_dir.exists()  # refused before the run dir (and its lock) is touched


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 4\nmax_steps: 10\nlog_freq: 2\nmax_steps: 20\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'max_steps' appears twice \(lines 2 and 4\)"):
        reader.load(str(path))
    path.write_text("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")  # nested mappings too
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(lines 2 and 3\)"):
        reader.load(str(path))


def test_hints_name_the_key_path_that_exists(tmp_path, capsys):
    assert train_main(["--config=configs/tiny.py", "--max_steps=3"]) == 2
    assert "(config keys are set as --config.max_steps=3)" in capsys.readouterr().err
    assert train_main(["--config=configs/tiny.py", "--lr=0.1"]) == 2
    assert "--config.optim.lr=0.1" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match="c.yaml: lr: no such key; did you mean optim.lr?"):
        reader.load(str(path))
    with pytest.raises(ConfigError, match="no such key; did you mean ckpt_freq?"):
        reader.load("configs/tiny.py", [("ckpt_frq", "3")])


def test_an_old_python_config_missing_keys_gets_the_defaults(tmp_path):
    path = tmp_path / "old.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'max_steps': 7, 'optim': {'lr': 1e-3}})\n")
    config = reader.load(str(path))
    assert config.max_steps == 7 and config.optim.lr == 1e-3
    assert config.model.attention_impl == schema.default_config().model.attention_impl


def test_old_args_yaml_is_read_with_todays_defaults(tmp_path):
    """A step dir whose args.yaml predates keys (model.attention_impl, checkpoint.allow_data_change)."""
    data = schema.default_config().to_dict()
    del data["model"]["attention_impl"], data["checkpoint"]["allow_data_change"]
    data["max_steps"] = 9
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(data))
    step = tmp_path / "checkpoints" / "checkpoint_000009"
    step.mkdir(parents=True)
    config = reader.read_step_config(step)
    assert config.max_steps == 9 and config.model.attention_impl == "auto"
    assert config.checkpoint.allow_data_change is False


def test_help_lists_every_key_with_its_comment():
    text = reader.help_text(None, [])
    for key, entry in schema.entries():
        if isinstance(entry, schema.Key):
            assert f"{key} = {entry.default!r}" in text and entry.comment in text, key
    assert "lora.rank = 8" in reader.help_text("configs/tiny.py", [])


def test_core_code_never_imports_configs():
    out = subprocess.run([sys.executable, "-c", "import sys, tttjax.main, tttjax.eval.__main__, tttjax.compile; "
                          "print(any(m == 'configs' or m.startswith('configs.') for m in sys.modules))"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_checks_refuse_what_they_should():
    assert schema.positive(math.nan) and schema.positive(0) and not schema.positive(1e-9)
    assert schema.between(0, 1, high_open=True)(1) and not schema.between(0, 1, high_open=True)(0)
    assert schema.at_least(1)(True)  # a bool is not a number
