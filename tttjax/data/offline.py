"""Stand-ins for the two downloads the data path and the server need, to run them offline:

    python -m tttjax.data.offline --mimi_weight mimi.safetensors --tokenizer tokenizer.model [--vocab_size 96]

writes a random-weight Mimi (codebooks filled, so codes vary) and a character-level sentencepiece
tokenizer, with the real files' formats, for `tttjax.data.prepare` and `conversion.moshi_server`
(docs/conversion.md): neither is a codec or tokenizer that means anything. The tests build their
inputs with them too.
"""

import argparse
import string
import sys
from pathlib import Path

from tttjax import cli

# Moshi's text tokenizer reserves 0 (unk), 1 (bos), 2 (eos), 3 (pad); the stand-in does too.
_SPM_SPECIAL = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
# The CLI's tokenizer: one piece per printable ASCII character, the word boundary and the 4 specials.
_CHARS = [c for c in string.printable if c.isprintable() and not c.isspace()]
MAX_VOCAB = len(_CHARS) + 1 + len(_SPM_SPECIAL)


def train_tokenizer(prefix: Path, sentences: list[str], vocab_size: int = 48) -> Path:
    """A character-level sentencepiece model (each word's tokens are easy to work out by hand)."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="char", character_coverage=1.0, add_dummy_prefix=False, minloglevel=2, **_SPM_SPECIAL,
    )
    return prefix.with_suffix(".model")


def save_random_mimi(path: Path, seed: int = 0) -> Path:
    """A randomly initialised Mimi whose codebooks are filled (an empty one maps every frame to one code)."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None)
    for name, buf in mimi.named_buffers():
        if name.endswith("embedding_sum"):
            buf.copy_(torch.randn_like(buf) * 0.01)
        elif name.endswith("_initialized"):
            buf.fill_(1)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(path))
    return path


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.data.offline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mimi_weight", help="write a random Mimi here (safetensors)")
    parser.add_argument("--tokenizer", help="write a character-level sentencepiece model here (.model)")
    parser.add_argument("--vocab_size", type=int, default=96,
                        help=f"tokenizer pieces, at least the model's text_card (default 96, configs/tiny.py's; "
                             f"at most {MAX_VOCAB})")
    parser.add_argument("--seed", type=int, default=0, help="Mimi's random weights")
    args = parser.parse_args(argv)
    if not (args.mimi_weight or args.tokenizer):
        parser.error("give --mimi_weight, --tokenizer or both")
    if not len(_SPM_SPECIAL) + 2 <= args.vocab_size <= MAX_VOCAB:
        parser.error(f"--vocab_size={args.vocab_size}: the character tokenizer has {len(_SPM_SPECIAL) + 2} to "
                     f"{MAX_VOCAB} pieces")
    if args.tokenizer:
        target = Path(args.tokenizer)
        if target.suffix != ".model":
            parser.error(f"--tokenizer={target}: name it NAME.model (sentencepiece writes NAME.model and NAME.vocab)")
        target.parent.mkdir(parents=True, exist_ok=True)
        chars = _CHARS[:args.vocab_size - 1 - len(_SPM_SPECIAL)]
        train_tokenizer(target.with_suffix(""), [" ".join(chars)] * 4, vocab_size=args.vocab_size)
        print(f"wrote {target} ({args.vocab_size} pieces)")
    if args.mimi_weight:
        Path(args.mimi_weight).parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {save_random_mimi(Path(args.mimi_weight), seed=args.seed)} (random Mimi)")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
