"""`python -m conversion.moshi_server`: moshi's server streaming a TTT export, spoken to through
moshi's websocket protocol (handshake byte 0; kind 1 = opus audio, 2 = text), offline.

The model: a random tttjax model (dim 64, 2 layers, TTT at layer 1, mini-batch 4; card 2048 and
n_q 16 / dep_q 8 as Mimi needs; text_card = the test tokenizer's vocabulary), exported into a
training step dir's `consolidated/`; a random Mimi with filled codebooks (docs/contract.md §9) and a
sentencepiece model trained here. Refused before anything loads, in one line: a model whose card is
not Mimi's (the README's tiny card 64), and no --static while the web client cannot be had (offline).
"""

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch_reference as ref
import toydata

from conversion.moshi_server import server_checkpoint
from conversion.to_pytorch import main as to_pytorch_main
from tttjax.data import offline

REPO = Path(__file__).resolve().parents[1]
FRAME = 1920  # 80 ms at 24 kHz: one Mimi frame
SECONDS = 2.0
KWARGS = ref.lm_kwargs(card=2048, depformer_num_layers=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import sentencepiece

    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    root = tmp_path_factory.mktemp("server")
    tokenizer = offline.train_tokenizer(root / "tok", ["hi yes abcdef go no ok", "the quick brown fox jumps over"])
    vocab = sentencepiece.SentencePieceProcessor(str(tokenizer)).vocab_size()
    cfg = from_lm_kwargs(KWARGS | dict(text_card=vocab), ttt_layers=(1,), ttt_mini_batch_size=4,
                         ttt_base_lr=10.0, ttt_initial_gating_alpha=1.0)
    save_model(root / "ckpt", create_model(cfg, seed=0))
    step = root / "run" / "checkpoints" / "checkpoint_000100"
    assert to_pytorch_main(["--checkpoint_dir", str(root / "ckpt"), "--out", str(step / "consolidated")]) == 0
    adapters = root / "adapters"
    assert to_pytorch_main(["--checkpoint_dir", str(root / "ckpt"), "--out", str(adapters), "--adapters_only"]) == 0
    return dict(step=step, adapters=adapters, mimi=offline.save_random_mimi(root / "mimi.safetensors"),
                tokenizer=tokenizer, root=root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def server_env():
    # Offline (a download attempt fails the test), one torch thread (the 2-core machine is shared) and
    # no torch.compile (moshi compiles its RMSNorm lazily: seconds at start-up, the same maths).
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_TORCH_COMPILE="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


async def talk(port: int, pcm: np.ndarray, expected_frames: int, timeout: float = 90.0, host: str = "localhost"):
    """moshi's client protocol: wait for the handshake, stream pcm as opus at real-time pace, collect
    the replies until `expected_frames` frames of audio came back. Returns (pcm back, texts)."""
    import aiohttp
    import sphn

    writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
    audio, texts = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://{host}:{port}/api/chat") as ws:
            assert await ws.receive_bytes(timeout=60) == b"\x00"

            async def receive():
                async for msg in ws:
                    assert msg.type == aiohttp.WSMsgType.BINARY, msg
                    kind, payload = msg.data[0], msg.data[1:]
                    if kind == 1:
                        audio.append(reader.append_bytes(payload))
                        if sum(a.shape[-1] for a in audio) >= expected_frames * FRAME:
                            return
                    else:
                        assert kind == 2, kind
                        texts.append(payload.decode())

            receiving = asyncio.create_task(receive())
            for start in range(0, len(pcm) - FRAME + 1, FRAME):
                data = writer.append_pcm(pcm[start:start + FRAME])
                if data:
                    await ws.send_bytes(b"\x01" + data)
                await asyncio.sleep(FRAME / 24000)
            await asyncio.wait_for(receiving, timeout)
    return np.concatenate(audio), texts


def wait_until_listening(proc, host: str, port: int, stderr_path, seconds: float) -> None:
    """Until the server accepts a connection; fails with its stderr if it exits first."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, stderr_path.read_text()
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"the server did not start listening in {seconds:g} s"
            time.sleep(0.5)


def test_server_talks_and_stops_cleanly(files, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "conversion.moshi_server", "--checkpoint_dir", str(files["step"]),
           "--mimi-weight", str(files["mimi"]), "--tokenizer", str(files["tokenizer"]), "--device", "cpu",
           "--static", "none", "--host", "localhost", "--port", str(port)]
    with open(tmp_path / "out", "w") as stdout, open(tmp_path / "err", "w") as stderr:  # a full pipe would block it
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(), stdout=stdout, stderr=stderr)
    try:
        wait_until_listening(proc, "localhost", port, tmp_path / "err", 120)
        pcm = toydata.speech_like(np.random.default_rng(0), SECONDS, channels=1)[0]
        # The server skips the first input frame and LMGen emits nothing for its max_delay first steps.
        expected = int(SECONDS * 12.5) - 2 - 2
        back, texts = asyncio.run(talk(port, pcm, expected))
        assert back.dtype == np.float32 and len(back) >= expected * FRAME and np.abs(back).max() > 0
        assert texts and all(isinstance(t, str) for t in texts)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out, err
    # --static none serves no web UI, and the banner says where the websocket is instead
    assert "Access the Web UI" not in out and "text token" in out
    assert f"no web UI (--static none); the websocket is at ws://localhost:{port}/api/chat" in out


def test_bad_flags_are_one_line_errors(files, capsys):
    from conversion.moshi_server import main

    # In process (a subprocess costs seconds of imports): one line and exit status 1; moshi.server's own
    # flags parse first.
    assert main(["--checkpoint_dir", str(files["step"]), "--tokenizer", str(files["tokenizer"]), "--device", "cpu",
                 "--static", "none"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --mimi-weight is required: the local Mimi weights "
                                               "(safetensors) file")
    from moshi.models import loaders

    assert loaders.CheckpointInfo.from_hf_repo.__qualname__ == "CheckpointInfo.from_hf_repo"  # restored
    good = dict(mimi_weights=files["mimi"], tokenizer=files["tokenizer"])
    root = files["root"]
    for kwargs, message in (
            (dict(good, tokenizer=root / "nope.model"), r"^--tokenizer .*nope.model: no such file$"),
            (dict(good, mimi_weights=None), r"^--mimi-weight is required"),
            (dict(good, config_path="c.json"), r"^--config-path: the export in --checkpoint_dir .* provides it"),
            (dict(good, moshi_weights=files["mimi"]), r"^--moshi-weight: .*consolidated.safetensors is a full model"),
            (dict(good, tokenizer=files["mimi"]), r"^--tokenizer .*mimi.safetensors: not a sentencepiece model")):
        with pytest.raises(ValueError, match=message):
            server_checkpoint(files["step"], **kwargs)
    with pytest.raises(ValueError, match=r"--checkpoint_dir .*ckpt: no config.json with consolidated.safetensors "
                                         r"or lora.safetensors .*conversion.to_pytorch"):
        server_checkpoint(root / "ckpt", **good)
    with pytest.raises(ValueError, match=r"lora.safetensors holds only the adapters \(LoRA/TTT\): pass the base "
                                         r"weights with --moshi-weight, or, .* python -m conversion.to_pytorch"):
        server_checkpoint(files["adapters"], **good)
    with pytest.raises(ValueError, match=r"^--mimi-weight: .*tok.model: header length \d+ does not fit the file's \d+ bytes"):
        server_checkpoint(files["step"], **dict(good, mimi_weights=files["tokenizer"]))


def test_a_model_whose_card_is_not_mimis_is_refused(files, tmp_path):
    """The README's tiny model (card 64) used to load and die at warm-up with an IndexError."""
    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    cfg = from_lm_kwargs(ref.lm_kwargs(card=64), ttt_layers=(1,), ttt_mini_batch_size=4)
    save_model(tmp_path / "ckpt", create_model(cfg, seed=0))
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")]) == 0
    with pytest.raises(ValueError) as error:
        server_checkpoint(tmp_path / "export", mimi_weights=files["mimi"], tokenizer=files["tokenizer"])
    assert str(error.value) == (
        f"--checkpoint_dir {tmp_path / 'export'}: the model's card is 64 but the Mimi codec ({files['mimi']}) has "
        "2048 codes per codebook; moshi's server needs a model trained with model.card=2048 (e.g. "
        "--config.model.card=2048 with configs/tiny.py)")


def test_the_web_client_is_checked_before_anything_loads(files, tmp_path):
    from conversion.moshi_server import check_web_client

    # Offline, no --static: one line, before a weight is read (it was a 21-frame hub traceback after).
    env = dict(server_env(), HF_HOME=str(tmp_path / "empty_hf_home"))
    run = subprocess.run([sys.executable, "-m", "conversion.moshi_server", "--checkpoint_dir", str(files["step"]),
                          "--mimi-weight", str(files["mimi"]), "--tokenizer", str(files["tokenizer"]),
                          "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == ("error: no web UI: moshi.server downloads it from the Hugging Face Hub "
                          "(kyutai/moshi-artifacts, dist.tgz) and it is not in the local Hugging Face cache and the "
                          "Hub cannot be reached; pass --static none (the /api/chat websocket only) or --static DIR "
                          "(a local build of moshi's web client)\n")
    # A local client build is a directory with its index.html.
    with pytest.raises(ValueError, match=r"^--static .*client: no index.html there"):
        check_web_client(str(tmp_path / "client"))
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "index.html").write_text("<html></html>")
    check_web_client(str(tmp_path / "client"))
    check_web_client("none")


def test_checkpoint_layouts_load_the_same_model(files, tmp_path):
    """Step dir, export dir and adapters + base weights give the same TTT model."""
    import torch

    info = server_checkpoint(files["step"], mimi_weights=files["mimi"], tokenizer=files["tokenizer"])
    assert info.moshi_weights == files["step"] / "consolidated" / "consolidated.safetensors"
    full = info.get_moshi(device="cpu", dtype=torch.float32)
    assert server_checkpoint(files["step"] / "consolidated", mimi_weights=files["mimi"],
                             tokenizer=files["tokenizer"]).moshi_weights == info.moshi_weights
    # The adapters' base: the full export without the TTT tensors (what a base moshi file holds).
    from safetensors.torch import load_file, save_file

    base = {k: v for k, v in load_file(str(info.moshi_weights)).items() if "seq_modeling_block" not in k}
    save_file(base, str(tmp_path / "base.safetensors"))
    adapters = server_checkpoint(files["adapters"], moshi_weights=tmp_path / "base.safetensors",
                                 mimi_weights=files["mimi"], tokenizer=files["tokenizer"])
    assert adapters.lora_weights == files["adapters"] / "lora.safetensors"
    again = adapters.get_moshi(device="cpu", dtype=torch.float32)
    codes = ref.random_codes(KWARGS | dict(text_card=info.lm_config["text_card"]), batch=1, frames=6)
    a, b = ref.torch_forward(full, codes), ref.torch_forward(again, codes)
    np.testing.assert_array_equal(a["logits"][a["mask"]], b["logits"][b["mask"]])


def recipe_commands() -> list[str]:
    """The commands of docs/conversion.md's offline block, backslash continuations joined."""
    doc = (REPO / "docs" / "conversion.md").read_text()
    section = doc.split("### Offline, nothing downloaded: a tiny servable model", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [" ".join(c.split()) for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_the_docs_offline_recipe_serves(tmp_path):
    """docs/conversion.md's offline block as written, run from a directory that has the repository's
    configs/ (as the repository root does); only the port is changed, to a free one."""
    *prepare, serve = recipe_commands()
    assert len(prepare) == 2 and serve.startswith("python -m conversion.moshi_server ")
    port = free_port()
    assert serve.count("--port 8998") == 1 and "--host 127.0.0.1" in serve and "--static none" in serve
    serve = serve.replace("--port 8998", f"--port {port}")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = dict(server_env(), PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    for command in prepare:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    with open(tmp_path / "out", "w") as stdout, open(tmp_path / "err", "w") as stderr:
        proc = subprocess.Popen(shlex.split(serve), cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
    try:
        wait_until_listening(proc, "127.0.0.1", port, tmp_path / "err", 180)
        pcm = toydata.speech_like(np.random.default_rng(1), SECONDS, channels=1)[0]
        expected = int(SECONDS * 12.5) - 2 - 2  # as in test_server_talks_and_stops_cleanly
        back, texts = asyncio.run(talk(port, pcm, expected, host="127.0.0.1"))
        assert len(back) >= expected * FRAME and np.abs(back).max() > 0 and texts
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "err").read_text()
    out = (tmp_path / "out").read_text()
    assert f"the websocket is at ws://127.0.0.1:{port}/api/chat" in out


def test_offline_cli_makes_the_asked_vocabulary_or_refuses(tmp_path, capsys):
    import sentencepiece

    assert offline.main(["--tokenizer", str(tmp_path / "t.model"), "--vocab_size", "99"]) == 0
    assert sentencepiece.SentencePieceProcessor(str(tmp_path / "t.model")).vocab_size() == 99
    capsys.readouterr()
    for argv, message in (
            (["--tokenizer", str(tmp_path / "u.model"), "--vocab_size", "100"],
             "--vocab_size=100: the character tokenizer has 6 to 99 pieces"),
            (["--tokenizer", str(tmp_path / "t.spm")], "name it NAME.model"),
            ([], "give --mimi_weight, --tokenizer or both")):
        with pytest.raises(SystemExit) as exit_info:
            offline.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "u.model").exists()
