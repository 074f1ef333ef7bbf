"""What a training run tells the terminal: every decision that changes what it does (a set-aside
step, nothing to do, an evaluation) as one line there as well as in train.log; a plain progress line
off a TTY; no run dir left behind by a run refused at start-up."""

import micro
import pytest

from tttjax.main import main as train_main
from tttjax.train import hooks

ARGS = micro.cli(max_steps=4, batch_size=4, duration_sec=1.28, log_freq=2, ckpt_freq=2, eval_freq=0)


def test_rerun_says_nothing_to_do_and_where_the_checkpoints_are(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_main(ARGS + [f"--config.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "step 2/4 loss" in out and "step 4/4 loss" in out  # off a TTY: plain lines
    assert out.strip().splitlines()[-1].startswith("finished: steps 0->4 of 4")
    assert train_main(ARGS + [f"--config.run_dir={run_dir}"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"nothing to do: the run already reached step 4; checkpoints [2, 4] in {run_dir}/checkpoints"
    assert train_main(ARGS + [f"--config.run_dir={run_dir}", "--config.max_steps=3"]) == 0
    assert "reached step 4 (max_steps=3 is below it)" in capsys.readouterr().out
    # An explicit earlier step: the later one is set aside, and the terminal says so.
    assert train_main(ARGS + [f"--config.run_dir={run_dir}", "--config.checkpoint.resume_step=2"]) == 0
    out = capsys.readouterr().out
    assert "note: resuming from step 2: moved the later steps [4] to" in out
    assert "note: resuming from step 2" in (run_dir / "logs" / "train.log").read_text()


def test_evaluation_results_reach_the_terminal(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_main(ARGS + [f"--config.run_dir={run_dir}", "--config.evals.standard.freq=4",
                              "--config.evals.standard.data=synthetic:8", "--config.evals.long_context.freq=4"]) == 0
    out = capsys.readouterr().out
    assert "note: evals.long_context.freq=4 but evals.long_context.data is empty: no long_context evaluation" in out
    assert "eval standard step 4: train_objective=" in out


def test_a_run_refused_at_start_up_leaves_no_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_main(ARGS + [f"--config.run_dir={run_dir}", f"--config.moshi_paths.moshi_path={tmp_path}/no"]) == 1
    assert "no such checkpoint directory or weights file" in capsys.readouterr().err
    assert not run_dir.exists()


def test_the_7b_default_is_named_when_it_does_not_fit(tmp_path, capsys, monkeypatch):
    """A config that names no model (a moshi-finetune YAML without `model:`) trains the 7B default."""
    from tttjax.analysis import memory

    monkeypatch.setattr(memory, "free_bytes", lambda: 1 << 30)
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nbatch_size: 1\nduration_sec: 10\n")
    assert train_main([f"--config={config}"]) == 1
    err = capsys.readouterr().err
    assert "(the model is the 7B default: set moshi_paths or model.*)" in err and "does not fit" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("interactive", [False, True])
def test_progress_off_a_tty_is_one_line_every_log_freq(capsys, interactive):
    progress = hooks.Progress(0, 6, 3, interactive=interactive)
    for step in range(1, 7):
        progress.on_step(hooks.StepInfo(step, {"loss": 1.0 / step, "frames_per_s": 100.0}, 0, last=step == 6))
    progress.close()
    out = capsys.readouterr()
    if interactive:
        assert "step 3/6" not in out.out and "train" in out.err  # the bar (tqdm writes to stderr)
    else:
        assert out.out.splitlines() == ["step 3/6 loss 0.3333 100 frames/s", "step 6/6 loss 0.1667 100 frames/s"]
