"""Training data: prepared code shards, TFDS and synthetic sources, and the step-indexed grain pipeline.

Importing this package never imports torch; `python -m tttjax.data.prepare` (which needs moshi) is
the only torch user.
"""

from tttjax.data.datasets import Mixture, make_dataset
from tttjax.data.pipeline import make_batch_iterator, make_eval_iterator
from tttjax.data.streams import FRAME_RATE, num_frames
from tttjax.data.synthetic import SyntheticDataset

__all__ = [
    "FRAME_RATE",
    "Mixture",
    "SyntheticDataset",
    "make_batch_iterator",
    "make_dataset",
    "make_eval_iterator",
    "num_frames",
]
