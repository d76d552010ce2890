"""MultiMNIST (paper, section 6): two overlapping digits of different classes.

Each 28x28 digit is centred on a 36x36 canvas and shifted by up to 4 pixels
in each direction (uniform integers in [-4, 4] for dy and dx, drawn per
digit), which keeps the whole 28x28 box on the canvas. Two digits of
different classes, from the same split, are overlaid with a pixel-wise max
(`merge='max'`, the default) or a sum clipped to 1 (`merge='sum'`).

Every pair is returned as a dict of numpy arrays:
  image:  (N, 36, 36, 1) float32 in [0, 1], the overlay;
  label:  (N, 2) int32, the first and the second digit's class (different);
  digits: (N, 2, 36, 36, 1) float32, each digit alone on its canvas, the
          target of the reconstruction of that digit's capsule.

Training pairs are made on the fly, a pure function of (seed, step) as
`batching.train_batch`: each epoch every training digit is the first
digit of one pair (same epoch permutation as MNIST training), its partner is
drawn uniformly among the training digits of another class, and the shifts
are random, from an rng seeded by (seed, step). Resuming only needs the step.

Evaluation pairs are a fixed `PairSet`: pair k has first digit k mod N (N
digits in the split), and its partner and shifts come from an rng seeded by
(seed, k // CHUNK_SIZE), so a set is generated lazily chunk by chunk and a
smaller set is a prefix of a larger one. The paper's test set, 1K pairs per
test digit (10M pairs, 52 GB of images), is
`PairSet(test_images, test_labels, pairs_per_digit=1000)` and is only ever
generated batch by batch.

The pairs' overlap is measured by `train/multimnist_overlap.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from train import batching
from train import transforms

CANVAS_SIZE = 36
MAX_SHIFT = 4
MERGE_MODES = ('max', 'sum')
CHUNK_SIZE = 1000  # pairs per rng chunk of a PairSet; fixed for stability.

Pairs = dict[str, np.ndarray]


# ---------------------------------------------------------------------------
# Building blocks.


def merge(first: np.ndarray, second: np.ndarray,
          mode: str = 'max') -> np.ndarray:
  """Overlays two images: pixel-wise max, or sum clipped to 1."""
  if mode == 'max':
    return np.maximum(first, second)
  if mode == 'sum':
    return np.minimum(first + second, np.float32(1))
  raise ValueError(f'merge {mode!r} must be one of {MERGE_MODES}')


def partner_indices(rng: np.random.Generator, labels: np.ndarray,
                    first: np.ndarray) -> np.ndarray:
  """For each first[i], a uniform index among examples of another class.

  Rejection sampling: draw uniformly from all examples, redraw the ones of
  the same class. Deterministic for a given rng state.
  """
  if len(np.unique(labels)) < 2:
    raise ValueError('MultiMNIST needs digits of at least two classes')
  second = rng.integers(0, len(labels), size=len(first))
  while True:
    same = labels[second] == labels[first]
    count = int(same.sum())
    if not count:
      return second
    second[same] = rng.integers(0, len(labels), size=count)


def make_pairs(images: np.ndarray, labels: np.ndarray, first: np.ndarray,
               second: np.ndarray, shifts: np.ndarray, merge_mode: str = 'max',
               canvas_size: int = CANVAS_SIZE) -> Pairs:
  """The pairs (images[first[i]], images[second[i]]), shifted and overlaid.

  Args:
    images: `(M, 28, 28, 1)` digits of one split; labels `(M,)`.
    first, second: `(N,)` indices of each pair's two digits.
    shifts: `(N, 2, 2)`: shifts[i, d] = (dy, dx) of digit d of pair i.
    merge_mode: 'max' or 'sum' (clipped to 1).
    canvas_size: 36 in the paper.

  Returns:
    dict(image (N, S, S, 1), label (N, 2) int32, digits (N, 2, S, S, 1)).
  """
  digits = np.stack([
      transforms.to_canvas(images[first], shifts[:, 0], canvas_size),
      transforms.to_canvas(images[second], shifts[:, 1], canvas_size)],
                    axis=1)
  return {
      'image': merge(digits[:, 0], digits[:, 1], merge_mode),
      'label': np.stack([labels[first], labels[second]],
                        axis=1).astype(np.int32),
      'digits': digits,
  }


# ---------------------------------------------------------------------------
# Training pairs, on the fly.


def train_batch(data: tuple[np.ndarray, np.ndarray], step: int,
                batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1, max_shift: int = MAX_SHIFT,
                merge_mode: str = 'max') -> Pairs:
  """This process's part of the global batch of MultiMNIST pairs of `step`.

  A pure function of (seed, step): the first digits are the rows
  `batching.step_rows(seed, step, ...)` (as MNIST's training batches),
  partners and shifts come from an rng seeded by (seed, 2, step). Process p gets rows [p B / P, (p + 1) B / P).

  Args:
    data: (images (M, 28, 28, 1), labels (M,)) of the training split.
    step, batch_size, seed, process_index, process_count: as
      `batching.train_batch`.
    max_shift: per-digit shift, 4 in the paper.
    merge_mode: 'max' or 'sum'.

  Returns:
    dict(image, label, digits) with B / P rows (see the module docstring).
  """
  images, labels = data
  rows = batching.host_rows(batch_size, process_index, process_count)
  first = batching.step_rows(seed, step, len(labels), batch_size)
  rng = np.random.default_rng([seed, 2, step])
  second = partner_indices(rng, labels, first)
  shifts = batching.sample_shifts(rng, (batch_size, 2), max_shift)
  return make_pairs(images, labels, first[rows], second[rows], shifts[rows],
                    merge_mode)


# ---------------------------------------------------------------------------
# Fixed evaluation pairs.


class PairSet:
  """A fixed set of MultiMNIST pairs of one split, generated lazily.

  Array-like where the training loop needs images: `len(pairs)`,
  `pairs[a:b]` (the overlaid images of pairs a..b-1), `pairs.labels`
  (N, 2); `pairs.pairs(a, b)` gives all three arrays, `pairs.batches(...)`
  padded evaluation batches with the digits.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               num_pairs: int | None = None, pairs_per_digit: int | None = None,
               seed: int = 0, max_shift: int = MAX_SHIFT,
               merge_mode: str = 'max'):
    """Pairs of `images`: `num_pairs` of them, or `pairs_per_digit` per digit.

    Exactly one of num_pairs and pairs_per_digit must be given (pairs per
    digit P gives P * len(images) pairs, each digit first in P of them).
    """
    if (num_pairs is None) == (pairs_per_digit is None):
      raise ValueError('give exactly one of num_pairs and pairs_per_digit')
    if pairs_per_digit is not None:
      num_pairs = pairs_per_digit * len(labels)
    if num_pairs < 0:
      raise ValueError(f'num_pairs {num_pairs} must be >= 0')
    if merge_mode not in MERGE_MODES:
      raise ValueError(f'merge {merge_mode!r} must be one of {MERGE_MODES}')
    self.images = images
    self._labels = labels
    self.num_pairs = num_pairs
    self.seed = seed
    self.max_shift = max_shift
    self.merge_mode = merge_mode
    self._all_labels = None
    self._cache: dict[int, tuple[np.ndarray, ...]] = {}

  def __len__(self) -> int:
    return self.num_pairs

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.num_pairs, CANVAS_SIZE, CANVAS_SIZE, self.images.shape[-1])

  def _chunk_indices(self, chunk: int):
    """(first, second, shifts) of the CHUNK_SIZE pairs of `chunk`."""
    if chunk not in self._cache:
      rng = np.random.default_rng([self.seed, 3, chunk])
      first = (np.arange(chunk * CHUNK_SIZE, (chunk + 1) * CHUNK_SIZE)
               % len(self._labels))
      second = partner_indices(rng, self._labels, first)
      if len(self._cache) >= 4:
        self._cache.pop(next(iter(self._cache)))
      self._cache[chunk] = (
          first, second,
          batching.sample_shifts(rng, (CHUNK_SIZE, 2), self.max_shift))
    return self._cache[chunk]

  def indices(self, start: int, stop: int):
    """(first, second, shifts) of pairs start..stop-1."""
    start, stop = max(start, 0), min(stop, self.num_pairs)
    if stop <= start:
      empty = np.zeros((0,), np.int64)
      return empty, empty, np.zeros((0, 2, 2), np.int64)
    parts = [self._chunk_indices(chunk)
             for chunk in range(start // CHUNK_SIZE,
                                (stop - 1) // CHUNK_SIZE + 1)]
    offset = (start // CHUNK_SIZE) * CHUNK_SIZE
    return tuple(np.concatenate([part[i] for part in parts])
                 [start - offset:stop - offset] for i in range(3))

  def pairs(self, start: int = 0, stop: int | None = None) -> Pairs:
    """dict(image, label, digits) of pairs start..stop-1."""
    stop = self.num_pairs if stop is None else stop
    first, second, shifts = self.indices(start, stop)
    return make_pairs(self.images, self._labels, first, second, shifts,
                      self.merge_mode)

  @property
  def labels(self) -> np.ndarray:
    """(N, 2) int32 labels of every pair (cheap: no images are made)."""
    if self._all_labels is None:
      labels = np.empty((self.num_pairs, 2), np.int32)
      for start in range(0, self.num_pairs, CHUNK_SIZE):
        first, second, _ = self.indices(start, start + CHUNK_SIZE)
        labels[start:start + len(first), 0] = self._labels[first]
        labels[start:start + len(first), 1] = self._labels[second]
      self._all_labels = labels
    return self._all_labels

  def __getitem__(self, index) -> np.ndarray:
    """pairs[a:b] -> the overlaid images of those pairs."""
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError('a PairSet is indexed by contiguous slices only')
    start, stop, _ = index.indices(self.num_pairs)
    return self.pairs(start, stop)['image']

  def batches(self, batch_size: int, process_index: int = 0,
              process_count: int = 1) -> Iterator[Pairs]:
    """Every pair once, in order, in padded batches as
    `batching.eval_batches`: zero rows and `mask` 0 for the padding."""
    rows_of_host = batching.host_rows(batch_size, process_index,
                                      process_count)
    for batch_index in range(
        batching.num_eval_batches(self.num_pairs, batch_size)):
      start = batch_index * batch_size
      rows = np.arange(start, start + batch_size)[rows_of_host]
      real = rows[rows < self.num_pairs]
      batch = (self.pairs(int(real[0]), int(real[-1]) + 1) if len(real) else
               self.pairs(0, 0))
      yield batching.pad_batch(batch, len(rows))

  def first(self, count: int) -> Pairs:
    """dict(image, label, digits) of the first `count` pairs."""
    return self.pairs(0, count)


def generate(images: np.ndarray, labels: np.ndarray, num_pairs: int,
             seed: int = 0, merge_mode: str = 'max') -> Pairs:
  """`num_pairs` fixed pairs as arrays: dict(image, label, digits)."""
  return PairSet(images, labels, num_pairs=num_pairs, seed=seed,
                 merge_mode=merge_mode).pairs()


# ---------------------------------------------------------------------------
# The training program's dataset 'multimnist' (train/configs/multimnist.py).


def config_problems(config: ml_collections.ConfigDict
                    ) -> list[tuple[str, str]]:
  """(field, message) of each impossible MultiMNIST setting."""
  problems = []
  if config.max_shift > MAX_SHIFT:
    problems.append(('max_shift', f'must be <= {MAX_SHIFT} for MultiMNIST '
                     f'(the digit must stay on the {CANVAS_SIZE}x'
                     f'{CANVAS_SIZE} canvas)'))
  if config.multimnist.merge not in MERGE_MODES:
    problems.append(('multimnist.merge', f'must be one of {MERGE_MODES}'))
  return problems


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  del config
  return (CANVAS_SIZE, CANVAS_SIZE, 1)


def config_train_batch(config: ml_collections.ConfigDict,
                       data: tuple[np.ndarray, np.ndarray], step: int,
                       process_index: int, process_count: int) -> Pairs:
  """`train_batch` with the config's settings."""
  return train_batch(data, step, config.batch_size, config.seed,
                     process_index, process_count, max_shift=config.max_shift,
                     merge_mode=config.multimnist.merge)


def eval_sets(config: ml_collections.ConfigDict, validation, test,
              limit: int) -> tuple[PairSet, PairSet]:
  """The fixed validation and test pairs of the validation and test digits
  (`(images, labels)` each), at most `limit` of each when limit > 0."""
  settings = config.multimnist

  def limited(count):
    return count if limit <= 0 else min(count, limit)

  validation_pairs = PairSet(
      *validation, seed=settings.eval_seed, merge_mode=settings.merge,
      max_shift=config.max_shift,
      num_pairs=limited(settings.num_validation_pairs))
  if settings.test_pairs_per_digit > 0 and limit <= 0:
    test_pairs = PairSet(
        *test, pairs_per_digit=settings.test_pairs_per_digit,
        seed=settings.eval_seed + 1, merge_mode=settings.merge,
        max_shift=config.max_shift)
  else:
    test_pairs = PairSet(
        *test, seed=settings.eval_seed + 1, merge_mode=settings.merge,
        max_shift=config.max_shift,
        num_pairs=limited(settings.num_test_pairs))
  return validation_pairs, test_pairs
