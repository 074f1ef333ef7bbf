"""Write prepared examples as a TFDS dataset in ArrayRecord format, without TensorFlow.

`tfds.core.GeneratorBasedBuilder` with `file_format="array_record"` serializes and writes with
TFDS's own protobuf code (no TensorFlow import); `TfdsSource` reads the result back with
`tfds.data_source`. (`tfds.dataset_builders.store_as_tfds_dataset` does need TensorFlow.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tttjax.data.streams import NUM_STREAMS
from tttjax.errors import UserError

VERSION = "1.0.0"


def write_tfds(examples, data_dir: str | Path, name: str, split: str = "train") -> Path:
    """Write `examples` (a sequence of int [17, T] code arrays) as TFDS dataset `name` (VERSION,
    one `split`) under `data_dir`; returns the dataset's directory. Read it as `tfds:name` with
    TFDS_DATA_DIR=data_dir."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError("--format tfds needs tensorflow-datasets and importlib_resources "
                         "(pip install tensorflow-datasets importlib_resources; not TensorFlow)") from None

    class CodesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # one per call
        VERSION = tfds.core.Version(globals()["VERSION"])

        def _info(self):
            codes = tfds.features.Tensor(shape=(NUM_STREAMS, None), dtype=np.int32)
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"codes": codes}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples()}

        def _generate_examples(self):
            for i in range(len(examples)):
                yield i, {"codes": np.asarray(examples[i], dtype=np.int32)}

    CodesBuilder.name = name
    builder = CodesBuilder(data_dir=str(Path(data_dir).absolute()), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
