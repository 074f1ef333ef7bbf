"""Data pipeline throughput: prepare (seconds of stereo audio per second) and the loader (frames/s).

python bench/data_pipeline.py [--files 6 --file_sec 20 --duration_sec 10]
Builds toy inputs (speech-like stereo wavs, alignments, a char tokenizer and a random-weight Mimi:
same compute as the real one), runs prepare on them, then times the training iterator over a
prepared dir of pre-tokenized codes and over the synthetic dataset. Prints a table and writes
bench/results/data_pipeline.json.
"""

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import toydata  # noqa: E402  (tests/toydata.py: the local inputs the tests build)

from tttjax.data import make_batch_iterator, make_dataset, num_frames, offline, prepare  # noqa: E402

WORDS = "hello world this is moshi speaking how are you today fine thanks".split()


def bench_prepare(root: Path, files: int, file_sec: float, duration_sec: float) -> dict:
    rng = np.random.default_rng(0)
    data = root / "wavs"
    data.mkdir()
    entries = []
    for i in range(files):
        wav = data / f"{i:03d}.wav"
        toydata.write_wav(wav, toydata.speech_like(rng, file_sec))
        starts = np.arange(0.2, file_sec - 0.5, 0.45)
        words = [(WORDS[j % len(WORDS)], s, s + 0.35, "SPEAKER_MAIN") for j, s in enumerate(starts)]
        toydata.write_alignments(wav, words)
        entries.append((wav.name, file_sec))
    toydata.write_jsonl(data / "train.jsonl", entries)
    tokenizer = offline.train_tokenizer(root / "tok", [" ".join(WORDS)] * 4)
    mimi = offline.save_random_mimi(root / "mimi.safetensors")
    argv = ["--jsonl", str(data / "train.jsonl"), "--out", str(root / "prepared"), "--mimi_weight", str(mimi),
            "--tokenizer", str(tokenizer), "--duration_sec", str(duration_sec)]
    start = time.perf_counter()
    prepare.main(argv)
    seconds = time.perf_counter() - start
    audio = files * file_sec
    return {"audio_sec": audio, "wall_sec": seconds, "audio_sec_per_sec": audio / seconds,
            "note": "includes loading Mimi; stereo seconds (both channels encoded)"}


def bench_loader(dataset, *, batch: int, frames: int, workers: int, seconds: float) -> dict:
    it = make_batch_iterator(dataset, global_batch_size=batch, start_step=0, seed=0, num_workers=workers)
    start = time.perf_counter()
    next(it)  # worker start-up and first batch
    first = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        count += 1
    rate = count / (time.perf_counter() - start)
    return {"first_batch_sec": first, "batches_per_sec": rate, "frames_per_sec": rate * batch * frames}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=6)
    p.add_argument("--file_sec", type=float, default=20.0)
    p.add_argument("--duration_sec", type=float, default=10.0, help="prepare's segment length")
    p.add_argument("--train_sec", type=float, default=100.0, help="loader example length (1250 frames)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--loader_sec", type=float, default=5.0, help="timing window per loader row")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_pipeline.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    frames = num_frames(args.train_sec)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "loader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["prepare"] = bench_prepare(root, args.files, args.file_sec, args.duration_sec)
        codes = np.random.default_rng(0).integers(0, 2048, size=(256, 17, frames), dtype=np.int16)
        np.save(root / "codes.npy", codes)
        prepare.main(["--codes", str(root / "codes.npy"), "--out", str(root / "codes"),
                      "--duration_sec", str(args.train_sec)])
        kw = dict(num_frames=frames, card=2048, text_card=32000, n_q=16, seed=0)
        sources = {"prepared (ArrayRecord)": make_dataset(str(root / "codes"), **kw),
                   "synthetic": make_dataset("synthetic", **kw)}
        for name, ds in sources.items():
            for workers in (0, 2):
                results["loader"][f"{name}, {workers} workers"] = bench_loader(
                    ds, batch=args.batch, frames=frames, workers=workers, seconds=args.loader_sec
                )
    results["settings"] = vars(args) | {"out": str(args.out), "loader_frames": frames}
    pr = results["prepare"]
    print(f"\nprepare: {pr['audio_sec']:.0f} s of stereo audio in {pr['wall_sec']:.1f} s = "
          f"{pr['audio_sec_per_sec']:.2f} audio s/s (incl. Mimi load)")
    print(f"\nloader, global batch {args.batch} x {frames} frames:")
    print(f"{'source':<36}{'first batch s':>14}{'batches/s':>12}{'frames/s':>14}")
    for name, row in results["loader"].items():
        print(f"{name:<36}{row['first_batch_sec']:>14.2f}{row['batches_per_sec']:>12.1f}"
              f"{row['frames_per_sec']:>14,.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
