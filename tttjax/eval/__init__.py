"""Evaluation of checkpoints: `python -m tttjax.eval` (docs/eval.md).

metrics.py   token-weighted standard metrics (also used by the training loop's eval_freq)
standard.py  standard metrics over a dataset spec or a codes.npy
paper.py     paper metrics: sequence scoring, pairwise accuracy, ZeroSpeech score files
manifest.py  pair manifests built from the official sLM21 / StoryCloze layouts
audio.py     Mimi codes of the benchmark wavs, cached on disk
memory.py    batch-size guard (fits / OOM messages)
long_context.py  the long-context curve (python -m tttjax.eval.long_context)
"""
