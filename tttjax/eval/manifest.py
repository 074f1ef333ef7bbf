"""Paper-metric pair manifests: one explicit JSONL row per (positive, negative) trial.

    python -m tttjax.eval.manifest --task swuggy --layout DIR [--split dev] --out swuggy_dev.jsonl

A row (docs/eval.md):
    {"task": "sblimp", "split": "dev", "pair_id": "morphology/regular_plural/12", "voice": "Joanna",
     "pos": "/abs/path/a.wav", "neg": "/abs/path/b.wav", "pos_text": "...", "neg_text": "...",
     "group": "morphology", "meta": {...}}

`pair_id` is what trials are averaged over (the voices of one pair); `group` is what results are
broken down by (sWUGGY: the LibriSpeech frequency band of the word, `oov` = not in LibriSpeech;
sBLIMP: the BLiMP type; story tasks: ""). Pairing is explicit, never inferred from file order.

Official layouts read here:
  sLM21 (ZeroSpeech 2021) lexical / syntactic: `gold.csv` + `<filename>.wav` in one directory.
    lexical  columns: filename, voice, frequency, word, phones, length, correct, id
             pairs: (id, voice), correct=1 the word, correct=0 the non-word
    syntactic columns: filename, type, subtype, transcription, correct, voice, id
             pairs: (type, subtype, id, voice)
  Spoken / topic StoryCloze: `<key>_correct.wav` and `<key>_incorrect.wav` (e.g.
    `12_3f2a..._correct.wav`), anywhere below the directory; a sub-directory name is the voice;
    an optional `<key>_correct.txt` / `_incorrect.txt` is the transcript.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from tttjax.errors import UserError

TASKS = ("swuggy", "sblimp", "sstorycloze", "tstorycloze")
_ALIASES = {"lexical": "swuggy", "syntactic": "sblimp", "ssc": "sstorycloze", "tsc": "tstorycloze",
            "swuggy": "swuggy", "sblimp": "sblimp", "sstorycloze": "sstorycloze", "tstorycloze": "tstorycloze"}
_SLM21_DIR = {"swuggy": "lexical", "sblimp": "syntactic"}
# zerospeech2021/lexical.py: pandas.cut(frequency, [0, 1, 5, 20, 100, inf], right=False)
FREQUENCY_BANDS = ((0, 1, "oov"), (1, 5, "1-5"), (5, 20, "6-20"), (20, 100, "21-100"), (100, math.inf, ">100"))


class ManifestError(UserError):
    """A layout or manifest that cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Pair:
    task: str
    split: str
    pair_id: str
    voice: str
    pos: str
    neg: str
    pos_text: str = ""
    neg_text: str = ""
    group: str = ""
    meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def canonical_task(name: str) -> str:
    task = _ALIASES.get(name.strip().lower())
    if task is None:
        raise ManifestError(f"unknown paper-metric task {name!r}; expected one of {list(TASKS)}")
    return task


def frequency_band(frequency) -> str | None:
    """The ZeroSpeech band of a LibriSpeech word count (None when unknown)."""
    if frequency is None or frequency == "":
        return None
    try:
        value = float(frequency)
    except ValueError:
        return None
    for low, high, label in FREQUENCY_BANDS:
        if low <= value < high:
            return label
    return None


def find_gold(layout: str | Path, task: str, split: str) -> Path:
    """gold.csv of an sLM21 task: DIR/gold.csv, DIR/<split>/gold.csv or DIR/<lexical|syntactic>/<split>/gold.csv."""
    root = Path(layout)
    sub = _SLM21_DIR[task]
    for candidate in (root / "gold.csv", root / split / "gold.csv", root / sub / split / "gold.csv"):
        if candidate.is_file():
            return candidate
    raise ManifestError(f"{root}: no gold.csv for {task} (looked in ., {split}/ and {sub}/{split}/)")


def _read_gold(path: Path, required: tuple[str, ...]) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return list(reader)


def _wav(directory: Path, filename: str, gold: Path) -> str:
    path = directory / (filename if filename.endswith(".wav") else f"{filename}.wav")
    if not path.is_file():
        raise ManifestError(f"{gold}: {path.name} listed but not found in {directory}")
    return str(path.absolute())


def _pair_rows(rows: list[dict], key_fields: tuple[str, ...], gold: Path) -> dict[tuple, dict[int, dict]]:
    """{key: {1: correct row, 0: incorrect row}}, checking each key has exactly one of each."""
    pairs: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for row in rows:
        key = tuple(row[k] for k in key_fields)
        try:
            correct = int(float(row["correct"]))
        except ValueError:
            raise ManifestError(f"{gold}: correct={row['correct']!r} for {row['filename']}") from None
        if correct not in (0, 1):
            raise ManifestError(f"{gold}: correct={row['correct']!r} for {row['filename']}")
        if correct in pairs[key]:
            raise ManifestError(f"{gold}: two correct={correct} rows for {dict(zip(key_fields, key))}")
        pairs[key][correct] = row
    broken = [dict(zip(key_fields, k)) for k, v in pairs.items() if len(v) != 2]
    if broken:
        raise ManifestError(f"{gold}: {len(broken)} unpaired rows, e.g. {broken[0]}")
    return pairs


def slm21_pairs(layout: str | Path, task: str, split: str = "dev") -> list[Pair]:
    """sWUGGY or sBLIMP trials from an sLM21 gold.csv and its wavs."""
    task = canonical_task(task)
    if task not in _SLM21_DIR:
        raise ManifestError(f"{task} is not an sLM21 task (swuggy, sblimp)")
    gold = find_gold(layout, task, split)
    directory = gold.parent
    out = []
    if task == "swuggy":
        rows = _read_gold(gold, ("filename", "voice", "frequency", "word", "correct", "id"))
        for (pid, voice), pair in _pair_rows(rows, ("id", "voice"), gold).items():
            word, nonword = pair[1], pair[0]
            band = frequency_band(word["frequency"])
            out.append(Pair(task, split, pid, voice, _wav(directory, word["filename"], gold),
                            _wav(directory, nonword["filename"], gold), word["word"], nonword["word"],
                            band or "", meta={"frequency": word["frequency"], "length": word.get("length", "")}))
    else:
        rows = _read_gold(gold, ("filename", "type", "subtype", "transcription", "correct", "voice", "id"))
        for (typ, subtype, pid, voice), pair in _pair_rows(rows, ("type", "subtype", "id", "voice"), gold).items():
            good, bad = pair[1], pair[0]
            out.append(Pair(task, split, f"{typ}/{subtype}/{pid}", voice, _wav(directory, good["filename"], gold),
                            _wav(directory, bad["filename"], gold), good["transcription"], bad["transcription"],
                            typ, meta={"subtype": subtype}))
    return sorted(out, key=lambda p: (p.pair_id, p.voice))


def story_pairs(layout: str | Path, task: str, split: str = "test") -> list[Pair]:
    """sStoryCloze / tStoryCloze trials from `<key>_correct.wav` / `<key>_incorrect.wav` files."""
    task = canonical_task(task)
    if task not in ("sstorycloze", "tstorycloze"):
        raise ManifestError(f"{task} is not a StoryCloze task (sstorycloze, tstorycloze)")
    root = Path(layout)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory")
    files: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for wav in sorted(root.rglob("*.wav")):
        stem = wav.stem
        for label in ("correct", "incorrect"):
            if stem.endswith(f"_{label}") and not (label == "correct" and stem.endswith("_incorrect")):
                voice = str(wav.parent.relative_to(root)) if wav.parent != root else ""
                files[(stem[: -len(label) - 1], voice)][label] = wav
    if not files:
        raise ManifestError(f"{root}: no *_correct.wav / *_incorrect.wav files")
    broken = [f"{voice + '/' if voice else ''}{key}" for (key, voice), v in files.items() if len(v) != 2]
    if broken:
        raise ManifestError(f"{root}: {len(broken)} stories without both endings, e.g. {broken[0]}")

    def text(wav: Path) -> str:
        txt = wav.with_suffix(".txt")
        return txt.read_text().strip() if txt.is_file() else ""

    out = [Pair(task, split, key, voice, str(v["correct"].absolute()), str(v["incorrect"].absolute()),
                text(v["correct"]), text(v["incorrect"])) for (key, voice), v in files.items()]
    return sorted(out, key=lambda p: (p.pair_id, p.voice))


def pairs_from_layout(layout: str | Path, task: str, split: str) -> list[Pair]:
    task = canonical_task(task)
    return slm21_pairs(layout, task, split) if task in _SLM21_DIR else story_pairs(layout, task, split)


def write_manifest(path: str | Path, pairs: list[Pair]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(p.to_json(), sort_keys=True) + "\n" for p in pairs))
    tmp.replace(path)
    return path


_REQUIRED = ("task", "pair_id", "pos", "neg")


def read_manifest(path: str | Path) -> list[Pair]:
    """Rows of a manifest JSONL; relative wav paths are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    out = []
    fields = {f.name for f in dataclasses.fields(Pair)}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{lineno}: not JSON ({e})") from None
        missing = [k for k in _REQUIRED if k not in row]
        unknown = sorted(set(row) - fields)
        if missing or unknown or not isinstance(row, dict):
            raise ManifestError(f"{path}:{lineno}: missing keys {missing}, unknown keys {unknown}")
        row = dict(row, task=canonical_task(row["task"]), split=str(row.get("split", "")),
                   voice=str(row.get("voice", "")), pair_id=str(row["pair_id"]))
        for side in ("pos", "neg"):
            wav = Path(row[side])
            row[side] = str(wav if wav.is_absolute() else (path.parent / wav).absolute())
        out.append(Pair(**row))
    if not out:
        raise ManifestError(f"{path}: empty manifest")
    seen = set()
    for p in out:
        key = (p.task, p.split, p.pair_id, p.voice)
        if key in seen:
            raise ManifestError(f"{path}: duplicate trial {key}")
        seen.add(key)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.eval.manifest",
                                     description="Build a paper-metric pair manifest from an official layout.")
    parser.add_argument("--task", required=True, help=f"one of {list(TASKS)}")
    parser.add_argument("--layout", required=True, help="sLM21 dir (gold.csv + wavs) or StoryCloze wav dir")
    parser.add_argument("--split", default=None, help="dev/test for sLM21 (default dev); a label for stories")
    parser.add_argument("--out", required=True, help="the JSONL to write")
    args = parser.parse_args(argv)
    try:
        task = canonical_task(args.task)
        split = args.split or ("dev" if task in _SLM21_DIR else "test")
        pairs = pairs_from_layout(args.layout, task, split)
        write_manifest(args.out, pairs)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(pairs)} {task} trials "
          f"({len({p.pair_id for p in pairs})} pairs, {len({p.voice for p in pairs})} voices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
