"""The grain pipeline: step-indexed global batches, sliced per process, so resume is exact anywhere.

Global example g (the j-th row of step s's global batch, g = s * B + j) is a pure function of
(dataset, seed, g): each source is globally shuffled with a seed derived from `seed`, reshuffled
per epoch (grain's index shuffle with seed + epoch), repeated, mixed by weight (grain's
deterministic proportional mixing), and cut to a random `num_frames` segment drawn from
(seed, g). Process p of P reads rows [p*B/P, (p+1)*B/P) of each global batch, and the iterator
starts at global example `start_step * B` (or `start_example`) by slicing, so no iterator state
has to be saved and the number of processes or workers can change between runs.
"""

import grain
import numpy as np

from tttjax.data.datasets import Mixture
from tttjax.data.sources import PreparedSource
from tttjax.data.streams import FRAME_RATE, NO_TOKEN
from tttjax.errors import UserError

_SHUFFLE, _SEGMENT = 0, 1  # seed-derivation tags


def _subseed(seed: int, *tags: int) -> int:
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def _as_mixture(dataset) -> Mixture:
    return dataset if isinstance(dataset, Mixture) else Mixture(((dataset, 1.0),))


def _fit(codes: np.ndarray, num_frames: int | None, offset: int = 0) -> np.ndarray:
    """codes[:, offset:offset + num_frames] as int32, right-padded with -1."""
    codes = np.asarray(codes, dtype=np.int32)
    if num_frames is None:
        return codes
    codes = codes[:, offset : offset + num_frames]
    if codes.shape[1] < num_frames:
        codes = np.pad(codes, ((0, 0), (0, num_frames - codes.shape[1])), constant_values=NO_TOKEN)
    return codes


class _RandomSegment(grain.transforms.RandomMap):
    """A uniformly placed num_frames window of an example (the whole example if it is shorter)."""

    def __init__(self, num_frames: int | None):
        self.num_frames = num_frames

    def random_map(self, codes, rng: np.random.Generator):
        length = np.shape(codes)[1]
        room = 0 if self.num_frames is None else max(0, length - self.num_frames)
        return _fit(codes, self.num_frames, int(rng.integers(room + 1)))


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise UserError(f"batch size {batch_size} is not a positive multiple of process_count {process_count}")
    return batch_size // process_count


def _check_not_cut(source, num_frames: int | None) -> None:
    """Refuses training windows longer than prepare's cut: their tail would be -1 padding nobody asked
    for. Whole files pad as usual, and so does eval (each example from its start)."""
    cut = source.cut_frames if isinstance(source, PreparedSource) else None
    if num_frames is not None and cut is not None and num_frames > cut:
        raise UserError(
            f"{source.data_dir}: prepared with --duration_sec {source.metadata['duration_sec']:g} (examples of at "
            f"most {cut} frames), but training asks for {num_frames} frames; re-prepare it with --duration_sec 0 "
            f"(whole conversations) or a larger --duration_sec, or train with duration_sec <= {cut / FRAME_RATE:g}"
        )


def _training_examples(mix: Mixture, seed: int, shuffle: bool) -> grain.MapDataset:
    """The infinite sequence of global examples (see the module docstring)."""
    parts = []
    for i, (source, _) in enumerate(mix.components):
        if len(source) == 0:
            raise UserError(f"{source!r}: empty dataset")
        _check_not_cut(source, mix.num_frames)
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=_subseed(seed, _SHUFFLE, i))
        parts.append(ds.repeat())
    weights = [w for _, w in mix.components]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    return ds.random_map(_RandomSegment(mix.num_frames), seed=_subseed(seed, _SEGMENT))


def _allow_grain_workers() -> None:
    """grain's worker processes read absl flags; outside absl.app.run they are not parsed yet."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_batch_iterator(dataset, *, global_batch_size: int, start_step: int, seed: int, shuffle: bool = True,
                        process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                        start_example: int | None = None):
    """This process's np.int32 [global_batch_size // process_count, 17, T] slices for steps start_step, ...

    The global batch of step s depends only on (dataset, seed, s, global_batch_size). `start_example`
    (default start_step * global_batch_size) starts elsewhere in the example sequence: a resume
    whose batch size changed continues after the examples the run has seen.
    """
    local = _check_processes(global_batch_size, process_index, process_count)
    if start_step < 0:
        raise UserError(f"start_step {start_step} < 0")
    first = start_step * global_batch_size if start_example is None else start_example
    examples = _training_examples(_as_mixture(dataset), seed, shuffle)[first:]
    # Local batch k*P + p of size B/P is rows [p*B/P, (p+1)*B/P) of global batch k.
    batches = examples.batch(local, batch_fn=np.stack)[process_index::process_count]
    it = batches.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    if num_workers > 0:
        _allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return iter(it)


class _Concat:
    """The components of a mixture one after the other (the eval order)."""

    def __init__(self, sources):
        self.sources = sources
        self.starts = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[k][index - int(self.starts[k])]


def make_eval_iterator(dataset, *, batch_size: int, process_index: int = 0, process_count: int = 1):
    """A fresh, finite, unshuffled pass: each example from its start, the last batch padded with -1 rows.

    batch_size is global; every process yields the same number of [batch_size // process_count, 17, T] batches.
    """
    local = _check_processes(batch_size, process_index, process_count)
    mix = _as_mixture(dataset)
    source = _Concat([s for s, _ in mix.components])
    n = len(source)
    if n == 0:
        return iter(())
    pad = np.full_like(_fit(source[0], mix.num_frames), NO_TOKEN)

    def row(i: int) -> np.ndarray:
        g = (i // local) * batch_size + process_index * local + i % local
        return _fit(source[g], mix.num_frames) if g < n else pad

    num_batches = -(-n // batch_size)
    ds = grain.MapDataset.range(num_batches * local).map(row).batch(local, batch_fn=np.stack)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
