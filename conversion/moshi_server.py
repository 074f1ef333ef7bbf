"""Talk to a TTT fine-tune: moshi's own server (web UI, `/api/chat` websocket, every `moshi.server`
flag) serving a tttjax export with its TTT layers streaming.

    python -m conversion.moshi_server --checkpoint_dir STEP_OR_EXPORT_DIR \\
        --mimi-weight mimi.safetensors --tokenizer tokenizer_spm_32k_3.model \\
        [--moshi-weight base.safetensors] [--device cpu] [--static none] [other moshi.server flags]

STEP_OR_EXPORT_DIR is a training step dir (`runs/x/checkpoints/checkpoint_000100/`, whose
`consolidated/` holds the export) or a `conversion.to_pytorch --out` dir: `config.json` with
`consolidated.safetensors` (the full model), or with `lora.safetensors` (adapters: LoRA and TTT
tensors) over the base weights given with `--moshi-weight`. Mimi and the tokenizer are local files.

How: `moshi.server` runs its `main()` on import and gets its LM from
`loaders.CheckpointInfo.from_hf_repo(...)` then `.get_moshi(...)`. This module replaces
`from_hf_repo`, at run time and in this process only, by a function that checks the flags and
returns a CheckpointInfo whose `get_moshi` builds the TTT model (`torch_ttt.load_ttt_moshi`), then
runs `moshi.server` unmodified (its ServerState, LMGen, routes, flags and shutdown). Without CUDA
it also makes `torch.cuda.synchronize` a no-op, because moshi.server's warm-up calls it
unconditionally (stock moshi.server cannot start on a CPU-only torch), and with `--static none`
its banner names the websocket rather than a web UI it does not serve. No file of the installed
moshi package is changed. Before anything loads, it checks that the web client can be had (a
`--static` directory, or the Hub's copy, cached or downloaded) and that the model's card is the
Mimi codec's. SIGTERM or Ctrl-C stops it with exit status 0 (aiohttp's graceful exit).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import runpy
import sys
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from moshi import client_utils
from moshi.models import loaders

from conversion.torch_ttt import check_config_streamable, load_ttt_moshi
from tttjax import cli
from tttjax.errors import UserError
from tttjax.rundir import ADAPTERS_FILE, CONFIG_FILE, CONSOLIDATED, FULL_FILE, read_json
from tttjax.weights.safetensors_io import SafetensorsReader

WEB_CLIENT = ("kyutai/moshi-artifacts", "dist.tgz")  # where moshi.server downloads its web UI from
_UI_LINE = "Access the Web UI directly at"  # moshi.server's banner, printed also with --static none


def find_export(checkpoint_dir: str | Path) -> Path:
    """The directory holding config.json and an export file: the dir itself or its `consolidated/`."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise UserError(f"--checkpoint_dir {root}: no such directory")
    for candidate in (root, root / CONSOLIDATED):
        if (candidate / CONFIG_FILE).is_file() and any((candidate / f).is_file() for f in (FULL_FILE, ADAPTERS_FILE)):
            return candidate
    raise UserError(f"--checkpoint_dir {root}: no {CONFIG_FILE} with {FULL_FILE} or {ADAPTERS_FILE} in it or in "
                     f"its consolidated/ (export a tttjax checkpoint with python -m conversion.to_pytorch first)")


def _local_file(flag: str, value, what: str) -> Path:
    if value is None:
        raise UserError(f"{flag} is required: the local {what} file")
    path = Path(value)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    return path


def mimi_card(path: Path) -> int:
    """The codes per codebook of a Mimi weights file, from its header (its codebooks' rows)."""
    try:
        with SafetensorsReader(path) as reader:
            rows = {reader.shape(n)[0] for n in reader.names() if n.endswith("_codebook.embedding_sum")}
    except ValueError as e:
        raise UserError(f"--mimi-weight: {e}") from None
    if len(rows) != 1:
        raise UserError(f"--mimi-weight {path}: not a Mimi weights file (no codebooks of one size)")
    return rows.pop()


def check_web_client(static: str | None) -> None:
    """moshi.server fetches its web client from the Hub only after loading every weight: find out
    first whether it can be had (a download now lands in the cache that moshi.server then reads)."""
    if static == "none":
        return
    if static is not None:
        if not (Path(static) / "index.html").is_file():
            raise UserError(f"--static {static}: no index.html there (a local build of moshi's web client, "
                             f"or none for the websocket only)")
        return
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # not a warning per retry
    try:
        hf_hub_download(*WEB_CLIENT)
    except LocalEntryNotFoundError:
        reason = "it is not in the local Hugging Face cache and the Hub cannot be reached"
    except OSError as e:
        reason = " ".join(str(e).split())[:200]
    else:
        return
    finally:
        hub_logger.setLevel(level)
    raise UserError(f"no web UI: moshi.server downloads it from the Hugging Face Hub ({WEB_CLIENT[0]}, "
                     f"{WEB_CLIENT[1]}) and {reason}; pass --static none (the /api/chat websocket only) or "
                     f"--static DIR (a local build of moshi's web client)")


def _banner(log, static: str | None):
    """moshi's `log`, with the web UI line of `--static none` saying where the websocket is instead
    (moshi.server prints it whether or not it serves a UI)."""

    def patched(level: str, msg: str) -> None:
        if static == "none" and msg.startswith(_UI_LINE):
            url = msg.rsplit(" ", 1)[-1].replace("http", "ws", 1)
            msg = f"no web UI (--static none); the websocket is at {url}/api/chat"
        log(level, msg)

    return patched


@dataclasses.dataclass
class TTTCheckpointInfo(loaders.CheckpointInfo):
    """moshi's CheckpointInfo for a tttjax export: `get_moshi` attaches the TTT layers."""

    config_file: Path | None = None

    def get_mimi(self, device="cpu"):
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda (moshi.server's default): CUDA is not available here; "
                             "pass --device cpu")
        return super().get_mimi(device=device)

    def get_moshi(self, device="cpu", dtype=torch.bfloat16, load_weight=True, fuse_lora=False, **_):
        from moshi.modules.lora import replace_lora_with_linear

        lm = load_ttt_moshi(self.moshi_weights, self.config_file, lora=self.lora_weights, device=device, dtype=dtype)
        if fuse_lora:
            replace_lora_with_linear(lm)
        return lm


def server_checkpoint(checkpoint_dir, *, moshi_weights=None, mimi_weights=None, tokenizer=None, config_path=None,
                      lora_weights=None) -> TTTCheckpointInfo:
    """What moshi.server loads for this export and these flags; ValueError names a bad flag."""
    export = find_export(checkpoint_dir)
    for flag, value in (("--config-path", config_path), ("--lora-weight", lora_weights)):
        if value is not None:
            raise UserError(f"{flag}: the export in --checkpoint_dir {checkpoint_dir} provides it; drop the flag")
    if (export / FULL_FILE).is_file():
        if moshi_weights is not None:
            raise UserError(f"--moshi-weight: {export / FULL_FILE} is a full model; the flag is only for "
                             f"adapters-only exports ({ADAPTERS_FILE})")
        weights, lora = export / FULL_FILE, None
    else:
        if moshi_weights is None:
            raise UserError(
                f"{export / ADAPTERS_FILE} holds only the adapters (LoRA/TTT): pass the base weights with "
                f"--moshi-weight, or, for a run without a base file (random init), serve its full export: "
                f"python -m conversion.to_pytorch --checkpoint_dir STEP_DIR --out DIR")
        weights, lora = _local_file("--moshi-weight", moshi_weights, "base weights"), export / ADAPTERS_FILE
    config = read_json(export / CONFIG_FILE)
    check_config_streamable(config.get("ttt") or {})
    mimi = _local_file("--mimi-weight", mimi_weights, "Mimi weights (safetensors)")
    codes = mimi_card(mimi)
    if config["card"] != codes:
        raise UserError(f"--checkpoint_dir {checkpoint_dir}: the model's card is {config['card']} but the Mimi "
                         f"codec ({mimi}) has {codes} codes per codebook; moshi's server needs a model trained "
                         f"with model.card={codes} (e.g. --config.model.card={codes} with configs/tiny.py)")
    tokenizer = _local_file("--tokenizer", tokenizer, "sentencepiece text tokenizer")
    import sentencepiece

    try:
        vocab = sentencepiece.SentencePieceProcessor(str(tokenizer)).vocab_size()
    except (OSError, RuntimeError) as e:
        raise UserError(f"--tokenizer {tokenizer}: not a sentencepiece model ({e})") from None
    if vocab < config["text_card"]:
        raise UserError(f"--tokenizer {tokenizer} has {vocab} pieces, fewer than the model's text_card "
                         f"{config['text_card']}")
    return TTTCheckpointInfo(weights, mimi, tokenizer, lm_config=config, raw_config=config, lora_weights=lora,
                             config_file=export / CONFIG_FILE)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conversion.moshi_server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="All other flags are moshi.server's (python -m moshi.server --help).")
    parser.add_argument("--checkpoint_dir", required=True, help="training step dir or conversion.to_pytorch output")
    args, moshi_argv = parser.parse_known_args(argv)
    static_flag = argparse.ArgumentParser(add_help=False)
    static_flag.add_argument("--static")
    static = static_flag.parse_known_args(moshi_argv)[0].static  # moshi.server's flag, read ahead of it
    check_web_client(static)

    def from_flags(hf_repo, moshi_weights=None, mimi_weights=None, tokenizer=None, config_path=None,
                   mimi_config_path=None, lora_weights=None, revision=None):
        return server_checkpoint(args.checkpoint_dir, moshi_weights=moshi_weights, mimi_weights=mimi_weights,
                                 tokenizer=tokenizer, config_path=config_path, lora_weights=lora_weights)

    saved = sys.argv, loaders.CheckpointInfo.__dict__["from_hf_repo"], torch.cuda.synchronize, client_utils.log
    sys.argv = ["moshi.server", *moshi_argv]
    loaders.CheckpointInfo.from_hf_repo = staticmethod(from_flags)
    client_utils.log = _banner(client_utils.log, static)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None
    try:
        runpy.run_module("moshi.server", run_name="__main__")
    finally:
        sys.argv, loaders.CheckpointInfo.from_hf_repo, torch.cuda.synchronize, client_utils.log = saved
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
