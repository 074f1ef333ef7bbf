"""python -m tttjax.data.prepare: moshi-finetune data (stereo wav + word alignments) -> DATA_DIR.

Each input file is cut into --duration_sec segments (from 0, as moshi-finetune chunks it), or kept
whole with --duration_sec 0 (one example per file, never cut: long-context training on whole
conversations); each segment's two channels are Mimi-encoded (batched, GPU when there is one) and
its text stream is built from the words starting in it. An example is [17, F] codes with F = the
segment's audio frames (the loader pads with -1). `--codes` takes pre-tokenized [17, T] /
[N, 17, T] .npy arrays (whole: one example per array).

`--verify DATA_DIR` checks every shard of a prepared dir against the sha256 in its metadata.json.

Resumable: inputs are cut into shards of --files_per_shard files; a shard and its manifest are
written atomically, so a rerun skips finished shards (after checking their sha256) and redoes the
rest. Bad inputs are reported with the file name, counted and skipped (--strict: stop).

`--format tfds` also writes the examples as a TFDS ArrayRecord dataset (--tfds_name, version
1.0.0, split train) under OUT/tfds, without TensorFlow: train on it with
`--config.data.train_data=tfds:NAME` and TFDS_DATA_DIR=OUT/tfds.
"""

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import tqdm

from tttjax import cli
from tttjax.data import shards
from tttjax.data.inputs import BadInput, parse_jsonl_line, read_alignments, read_stereo
from tttjax.data.interleave import segment_words, text_stream, tokenize_alignments
from tttjax.data.sources import PreparedSource
from tttjax.data.streams import (
    FRAME_RATE,
    MIMI_CARD,
    NO_TOKEN,
    NUM_STREAMS,
    SAMPLE_RATE,
    STREAM_NAMES,
    num_frames,
)
from tttjax.data.tfds_writer import write_tfds
from tttjax.errors import UserError

log = logging.getLogger("tttjax.data.prepare")
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
TFDS_DIR = "tfds"  # --format tfds: the TFDS data_dir inside OUT


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tttjax.data.prepare", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", type=Path, help="moshi-finetune jsonl; a.json beside each a.wav")
    src.add_argument("--codes", type=Path, nargs="+", help="pre-tokenized int .npy arrays [17, T] or [N, 17, T]")
    src.add_argument("--verify", type=Path, metavar="DATA_DIR",
                     help="check every shard of a prepared DATA_DIR against its sha256 in metadata.json")
    p.add_argument("--out", type=Path, help="the DATA_DIR to write (or resume)")
    p.add_argument("--mimi_weight", default=DEFAULT_REPO, help="safetensors file, hf://org/repo/file or repo id")
    p.add_argument("--tokenizer", default=DEFAULT_REPO, help="sentencepiece .model file, hf:// path or repo id")
    p.add_argument("--duration_sec", type=float, default=100.0,
                   help="segment (example) length; 0: whole files, one example per file, never cut")
    p.add_argument("--text_card", type=int, default=32000, help="--codes only: text ids must be below this")
    p.add_argument("--main_speaker", default="SPEAKER_MAIN", help="alignment speaker label of Moshi's words")
    p.add_argument("--duration_tolerance", type=float, default=0.1, help="allowed |jsonl duration - audio| (s)")
    p.add_argument("--files_per_shard", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8, help="segments per Mimi call")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--format", choices=("prepared", "tfds"), default="prepared",
                   help="tfds: also write OUT/tfds/NAME/1.0.0, a TFDS ArrayRecord dataset of the examples")
    p.add_argument("--tfds_name", default="moshi_codes", help="--format tfds: the dataset name (tfds:NAME)")
    args = p.parse_args(argv)
    if args.verify is None and args.out is None:
        p.error("--out is required with --jsonl / --codes")
    if not args.duration_sec >= 0:
        p.error("--duration_sec must be >= 0 (0: whole files)")
    if args.files_per_shard <= 0 or args.batch_size <= 0:
        p.error("--files_per_shard and --batch_size must be positive")
    return args


class _Prepare:
    """One prepare run: the inputs, the models, and the per-shard work."""

    def __init__(self, args):
        self.args = args
        self.seg_frames = num_frames(args.duration_sec)  # 0: whole files
        self.seg_samples = round(args.duration_sec * SAMPLE_RATE)
        self.seg_sec = args.duration_sec or math.inf  # a whole file's text holds all of its words
        if args.jsonl is not None:
            self.items = _jsonl_lines(args.jsonl)
            from tttjax.data import codec  # torch and moshi: only here

            try:
                tokenizer_file = codec.resolve_tokenizer(args.tokenizer)
                self.mimi_file = codec.resolve_mimi(args.mimi_weight)
            except ValueError as e:
                raise UserError(f"prepare: {e}") from None
            self.tokenizer = codec.load_tokenizer(tokenizer_file)
            self.text_card = self.tokenizer.vocab_size()
            self.inputs = {
                "jsonl": str(args.jsonl),
                "jsonl_sha256": shards.sha256_file(args.jsonl),
                "tokenizer_sha256": shards.sha256_file(tokenizer_file),
                "mimi_weight": str(self.mimi_file),
                "mimi_weight_sha256": shards.sha256_file(self.mimi_file),
            }
        else:
            self.items = [str(p) for p in args.codes]
            self.text_card = args.text_card
            self.inputs = {"codes_sha256": {str(p): _sha_or_none(p) for p in args.codes}}
        self.inputs.update(
            duration_sec=args.duration_sec,
            main_speaker=args.main_speaker,
            duration_tolerance=args.duration_tolerance,
            files_per_shard=args.files_per_shard,
            text_card=self.text_card,
        )
        self.dtype = np.int16 if max(self.text_card, MIMI_CARD) <= 2**15 else np.int32
        self._encoder = None

    @property
    def encoder(self):
        """Mimi, loaded on first use (a resumed run with nothing left to do never loads it)."""
        if self._encoder is None:
            from tttjax.data import codec

            self._encoder = codec.MimiEncoder(self.mimi_file, self.args.device)
        return self._encoder

    def bad(self, err: BadInput, sources: list, name: str) -> None:
        if self.args.strict:
            raise UserError(f"prepare: {err} (stopping: --strict)")
        log.warning("skipped: %s", err)
        sources.append({"name": name, "status": "skipped", "reason": str(err)})

    def wav_shard(self, lines, bar) -> tuple[list, list]:
        """Examples and source records of one shard of jsonl lines."""
        sources, plans, pending, codes = [], [], [], {}
        for lineno, line in lines:
            name = f"{self.args.jsonl}:{lineno}"
            try:
                entry = parse_jsonl_line(self.args.jsonl, lineno, line)
                name = entry.name
                wav, notes = read_stereo(entry, self.args.duration_tolerance)
                alignments = read_alignments(entry.wav)
            except BadInput as e:
                self.bad(e, sources, name)
                continue
            for note in notes:
                log.info("%s: %s", entry.wav, note)
            words = tokenize_alignments(self.tokenizer, alignments, self.args.main_speaker)
            pieces = _pieces(wav.shape[1], self.seg_samples)
            pending += [((len(plans), k), wav[:, piece]) for k, piece in enumerate(pieces)]
            sources.append({
                "name": entry.name,
                "status": "ok",
                "notes": notes,
                "audio_sec": wav.shape[1] / SAMPLE_RATE,
                "num_examples": len(pieces),
                "sha256": shards.sha256_file(entry.wav),
                "alignments_sha256": shards.sha256_file(entry.wav.with_suffix(".json")),
            })
            plans.append((words, len(pieces)))
            if len(pending) >= self.args.batch_size:
                self._encode(pending, codes, bar)
        self._encode(pending, codes, bar)
        examples = []
        for slot, (words, count) in enumerate(plans):
            for k in range(count):
                audio = codes[slot, k]
                start = k * self.seg_samples / SAMPLE_RATE
                text = text_stream(segment_words(words, start, self.seg_sec), audio.shape[-1])
                examples.append(np.concatenate([text[None], audio]).astype(self.dtype))
        return examples, sources

    def _encode(self, pending: list, codes: dict, bar) -> None:
        """Mimi-encodes the pending segments in batches of equal length (so no padding enters Mimi)."""
        by_length = defaultdict(list)
        for key, wav in pending:
            by_length[wav.shape[1]].append((key, wav))
        for group in by_length.values():
            for i in range(0, len(group), self.args.batch_size):
                chunk = group[i : i + self.args.batch_size]
                for (key, wav), c in zip(chunk, self.encoder.encode([w for _, w in chunk])):
                    codes[key] = c
                    bar.update(wav.shape[1] / SAMPLE_RATE)
        pending.clear()

    def codes_shard(self, paths, bar) -> tuple[list, list]:
        """Examples and source records of one shard of .npy files."""
        sources, examples = [], []
        for path in paths:
            try:
                arrays = _read_codes(Path(path), self.text_card)
            except BadInput as e:
                self.bad(e, sources, path)
                continue
            before = len(examples)
            for codes in arrays:
                pieces = _pieces(codes.shape[1], self.seg_frames)
                examples += [codes[:, piece].astype(self.dtype) for piece in pieces]
            frames = sum(c.shape[1] for c in arrays)
            sources.append({
                "name": path,
                "status": "ok",
                "notes": [],
                "audio_sec": frames / FRAME_RATE,
                "num_examples": len(examples) - before,
                "sha256": shards.sha256_file(Path(path)),
            })
            bar.update(frames / FRAME_RATE)
        return examples, sources


def _pieces(length: int, step: int) -> list[slice]:
    """The examples of an input `length` long: `step` long each from 0, or the whole input (step 0)."""
    step = step or length
    return [slice(s, s + step) for s in range(0, length, step)]


def _jsonl_lines(jsonl: Path) -> list[tuple[int, str]]:
    if not jsonl.is_file():
        raise UserError(f"prepare: {jsonl}: no such jsonl file")
    lines = jsonl.read_text().splitlines()
    return [(i + 1, line) for i, line in enumerate(lines) if line.strip()]


def _sha_or_none(path: Path) -> str | None:
    return shards.sha256_file(path) if path.is_file() else None


def _read_codes(path: Path, text_card: int) -> list[np.ndarray]:
    """The [17, T] arrays of a .npy file, trailing all -1 frames removed, ids checked."""
    if not path.is_file():
        raise BadInput(f"{path}: missing codes file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadInput(f"{path}: unreadable codes ({e})") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != NUM_STREAMS or not np.issubdtype(arr.dtype, np.integer):
        raise BadInput(f"{path}: expected integer codes [17, T] or [N, 17, T], got {arr.dtype} {arr.shape}")
    text, audio = arr[:, 0], arr[:, 1:]
    if text.size and (text.min() < NO_TOKEN or text.max() >= text_card):
        raise BadInput(f"{path}: text ids outside [-1, {text_card})")
    if audio.size and (audio.min() < NO_TOKEN or audio.max() >= MIMI_CARD):
        raise BadInput(f"{path}: audio ids outside [-1, {MIMI_CARD})")
    out = []
    for codes in arr:
        used = np.flatnonzero((codes != NO_TOKEN).any(axis=0))
        if used.size:
            out.append(codes[:, : used[-1] + 1])
    return out


def _check_inputs(out: Path, inputs: dict) -> None:
    """Refuses to resume a DATA_DIR that was started with other inputs or settings."""
    path = out / "prepare_inputs.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(inputs)):
            changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
            changed = ", ".join(changed)
            raise UserError(f"prepare: {out} was started with other inputs ({changed}); use a new --out")
    else:
        shards.write_json(path, inputs)


def _finished(out: Path, manifest: Path) -> dict | None:
    """The manifest of a shard that is completely and correctly written, else None."""
    if not manifest.is_file():
        return None
    done = json.loads(manifest.read_text())
    file = out / done["shard"]["file"]
    if not file.is_file() or shards.sha256_file(file) != done["shard"]["sha256"]:
        log.warning("%s: checksum mismatch or missing, redoing it", file)
        return None
    return done


def _metadata(job: _Prepare, manifests: list[dict]) -> dict:
    sources = [s for m in manifests for s in m["sources"]]
    shard_list = [m["shard"] for m in manifests]
    ok = [s for s in sources if s["status"] == "ok"]
    return {
        "format": shards.FORMAT,
        "created_by": "tttjax.data.prepare",
        "frame_rate": FRAME_RATE,
        "sample_rate": SAMPLE_RATE,
        "num_streams": NUM_STREAMS,
        "streams": STREAM_NAMES,
        "special_ids": {"text_pad": 3, "end_of_pad": 0, "no_token": NO_TOKEN},
        "dtype": np.dtype(job.dtype).name,
        "duration_sec": job.args.duration_sec,
        # Whole files: the longest example written, over every shard (a resumed run's too).
        "max_frames_per_example": job.seg_frames or max((m["max_frames"] for m in manifests), default=0),
        "num_examples": sum(s["num_examples"] for s in shard_list),
        "num_frames": sum(m["num_frames"] for m in manifests),
        "audio_sec": sum(s["audio_sec"] for s in ok),
        "card": MIMI_CARD,
        "text_card": job.text_card,
        "max_text_id": max((m["max_text_id"] for m in manifests), default=NO_TOKEN),
        "max_audio_id": max((m["max_audio_id"] for m in manifests), default=NO_TOKEN),
        "num_sources": len(sources),
        "num_skipped": len(sources) - len(ok),
        "inputs": job.inputs,
        "shards": shard_list,
        "sources": sources,
    }


def run(args) -> dict:
    """Prepares (or resumes) args.out; returns the metadata written."""
    job = _Prepare(args)
    out = args.out
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    _check_inputs(out, job.inputs)
    per = args.files_per_shard
    groups = [job.items[i : i + per] for i in range(0, len(job.items), per)]
    manifests = []
    with tqdm.tqdm(unit="s", desc="prepare (audio s)", file=sys.stderr, dynamic_ncols=True) as bar:
        for index, group in enumerate(groups):
            name = shards.shard_name(index, len(groups))
            manifest_path = out / "manifests" / (name + ".json")
            done = _finished(out, manifest_path)
            if done is None:
                process = job.wav_shard if args.jsonl is not None else job.codes_shard
                examples, sources = process(group, bar)
                done = {
                    "shard": shards.write_shard(out / name, examples),
                    "sources": sources,
                    "num_frames": sum(e.shape[1] for e in examples),
                    "max_frames": max((e.shape[1] for e in examples), default=0),
                    "max_text_id": int(max((e[0].max() for e in examples), default=NO_TOKEN)),
                    "max_audio_id": int(max((e[1:].max() for e in examples), default=NO_TOKEN)),
                }
                shards.write_json(manifest_path, done)
            else:
                log.info("%s: already prepared, skipping", name)
            manifests.append(done)
    meta = _metadata(job, manifests)
    shards.write_json(out / shards.METADATA, meta)
    log.info(
        "%s: %d examples from %d of %d files (%d skipped), %.1f s of audio, %d shards",
        out, meta["num_examples"], meta["num_sources"] - meta["num_skipped"], meta["num_sources"],
        meta["num_skipped"], meta["audio_sec"], len(groups),
    )
    for s in meta["sources"]:
        if s["status"] != "ok":
            log.info("  skipped %s: %s", s["name"], s["reason"])
    if args.format == "tfds":
        written = write_tfds(PreparedSource(out), out / TFDS_DIR, args.tfds_name)
        log.info("%s: TFDS dataset tfds:%s (TFDS_DATA_DIR=%s)", written, args.tfds_name, out / TFDS_DIR)
    return meta


def verify(data_dir: Path) -> int:
    """--verify: exit status 1 listing each corrupt shard, one line each."""
    problems = shards.verify_shards(data_dir)
    for problem in problems:
        cli.error(f"prepare: {problem}")
    if not problems:
        log.info("%s: every shard matches its sha256", data_dir)
    return 1 if problems else 0


def _main(argv: list[str]) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.verify is not None:
        return verify(args.verify)
    run(args)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
