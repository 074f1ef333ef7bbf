"""Evaluation of checkpoints: `python -m tttjax.eval` (docs/eval.md).

standard.py  the one Evaluator of the standard metrics (the CLI and the training loop's eval_freq)
metrics.py   token-weighted standard metrics from the summed loss terms, the printed table
paper.py     paper metrics: sequence scoring, pairwise accuracy, ZeroSpeech score files, the pipeline
manifest.py  pair manifests built from the official sLM21 / StoryCloze layouts
audio.py     Mimi codes of the benchmark wavs, cached on disk
long_context.py  the long-context curve (python -m tttjax.eval.long_context)
"""
