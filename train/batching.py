"""Batches of numpy arrays: training batches as a pure function of (seed,
step), evaluation batches that cover every example once, and a prefetch
thread. Knows nothing of any dataset.

A training batch needs no iterator state, so resuming after a crash only
needs the step, and the global batch is the same whatever the number of
processes: each process takes its own contiguous slice of it. Evaluation
batches pad the last batch with zero rows and mark the real ones in `mask`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------
# Augmentation.


def sample_shifts(rng: np.random.Generator, shape: int | tuple[int, ...],
                  max_shift: float, subpixel: bool = False) -> np.ndarray:
  """`(*shape, 2)` (dy, dx) shifts, uniform in [-max_shift, max_shift]: whole
  pixels (int), or with `subpixel` any real shift (float)."""
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  if subpixel:
    return rng.uniform(-max_shift, max_shift, size=(*shape, 2))
  max_shift = int(max_shift)
  return rng.integers(-max_shift, max_shift + 1, size=(*shape, 2))


def shift_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """Shifts image i by shifts[i] = (dy, dx) pixels, filling with zeros.

  images: (N, H, W) or (N, H, W, C). out[i, y, x] = images[i, y - dy, x - dx]
  where that is inside the image, else 0.
  """
  if len(images) == 0:
    return images.copy()
  pad = int(np.abs(shifts).max())
  height, width = images.shape[1:3]
  pad_width = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
  padded = np.pad(images, pad_width)
  rows = np.arange(height)[None, :] + (pad - shifts[:, 0:1])  # (N, H)
  cols = np.arange(width)[None, :] + (pad - shifts[:, 1:2])  # (N, W)
  index = np.arange(len(images))[:, None, None]
  return padded[index, rows[:, :, None], cols[:, None, :]]


def shift_images_bilinear(images: np.ndarray, shifts: np.ndarray
                          ) -> np.ndarray:
  """Shifts image i by real shifts[i] = (dy, dx) pixels, with bilinear
  interpolation and zeros outside the image (as Keras'
  ImageDataGenerator's shifts, interpolation order 1).

  out[i, y, x] = images[i, y - dy, x - dx], read between pixels: with dy =
  fy + ty (fy = floor(dy), 0 <= ty < 1), row y - dy lies between rows
  y - fy - 1 and y - fy, weighted ty and 1 - ty; the same along x. So the
  result is the four whole-pixel shifts (fy + a, fx + b), a, b in {0, 1},
  weighted (a ? ty : 1 - ty)(b ? tx : 1 - tx). Whole-pixel shifts give
  `shift_images`' result exactly.
  """
  shifts = np.asarray(shifts, np.float64)
  whole = np.floor(shifts)
  fraction = (shifts - whole).astype(images.dtype)
  whole = whole.astype(np.int64)
  weight_shape = (len(images),) + (1,) * (images.ndim - 1)
  result = np.zeros_like(images)
  for extra_y in (0, 1):
    weight_y = fraction[:, 0] if extra_y else 1 - fraction[:, 0]
    for extra_x in (0, 1):
      weight_x = fraction[:, 1] if extra_x else 1 - fraction[:, 1]
      weight = (weight_y * weight_x).reshape(weight_shape)
      if np.any(weight):
        result += weight * shift_images(images, whole + (extra_y, extra_x))
  return result


# ---------------------------------------------------------------------------
# Training batches.


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full training batches per epoch (the last partial batch is dropped)."""
  steps = num_examples // batch_size
  if steps < 1:
    raise ValueError(f'batch_size {batch_size} is larger than the '
                     f'{num_examples} training examples')
  return steps


def host_rows(batch_size: int, process_index: int, process_count: int
              ) -> slice:
  """This process's contiguous rows of a global batch."""
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} does not divide by '
                     f'process_count {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, {process_count})')
  per_host = batch_size // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the training set in `epoch`; a pure function of its args."""
  permutation = np.random.default_rng([seed, 0, epoch]).permutation(
      num_examples)
  permutation.flags.writeable = False
  return permutation


def step_rows(seed: int, step: int, num_examples: int,
              batch_size: int) -> np.ndarray:
  """The training examples of the global batch of `step`: rows
  [i * batch_size, (i + 1) * batch_size) of a permutation seeded by (seed,
  epoch), where epoch, i = divmod(step, steps_per_epoch)."""
  epoch, index = divmod(step, steps_per_epoch(num_examples, batch_size))
  permutation = _epoch_permutation(seed, epoch, num_examples)
  return permutation[index * batch_size:(index + 1) * batch_size]


def train_batch(data: tuple[np.ndarray, np.ndarray], step: int,
                batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1, max_shift: float = 2,
                subpixel_shifts: bool = False) -> Batch:
  """This process's part of the global training batch of `step`.

  The global batch is a pure function of (seed, step): the rows
  `step_rows(seed, step, ...)`, each image randomly shifted by up to
  `max_shift` pixels with an rng seeded by (seed, 1, step): whole pixels,
  or with `subpixel_shifts` any real shift, interpolated bilinearly. Process
  p of P gets rows [p * B / P, (p + 1) * B / P) of it.

  Args:
    data: (images, labels) of the training split.
    step: the training step, from 0.
    batch_size: global batch size B, divisible by process_count P.
    seed: data seed (non-negative int).
    process_index: p, this process.
    process_count: P.
    max_shift: augmentation shift; 0 for none.
    subpixel_shifts: real shifts (bilinear) instead of whole pixels.

  Returns:
    dict(image=float32 (B / P, H, W, C), label=int32 (B / P,)).
  """
  images, labels = data
  rows_of_host = host_rows(batch_size, process_index, process_count)
  rows = step_rows(seed, step, len(labels), batch_size)[rows_of_host]
  shifts = sample_shifts(np.random.default_rng([seed, 1, step]), batch_size,
                         max_shift, subpixel_shifts)[rows_of_host]
  shift = shift_images_bilinear if subpixel_shifts else shift_images
  return {'image': shift(images[rows], shifts), 'label': labels[rows]}


# Host memory that the arrays of a block of training batches share (see
# `batches_of_steps`): about 40 batches of 128 40x40 images, 64 of 28x28.
BLOCK_BYTES = 32 << 20
# At most this many batches a block, so that small batches (tests, tiny
# configs) are not made thousands of steps ahead of a run that may stop.
MAX_BLOCK_STEPS = 64
# Alignment of a block's batches: JAX's CPU client takes a NumPy array at
# least this aligned without copying it (`jax.device_put`).
HOST_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any,
                  alignment: int = HOST_ALIGNMENT) -> np.ndarray:
  """`np.empty(shape, dtype)` whose data starts at a multiple of
  `alignment` bytes."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(size + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + size].view(dtype).reshape(shape)


def batches_of_steps(batch_of_step: Callable[[int], Batch],
                     start_step: int = 0,
                     num_steps: int | None = None,
                     block_bytes: int = 0) -> Iterator[Batch]:
  """`batch_of_step(step)` for steps start_step, start_step + 1, ...
  (num_steps of them, or forever).

  With `block_bytes > 0` the batches are made a block at a time, as many as
  fit in `block_bytes` (at least one, at most `MAX_BLOCK_STEPS`), into
  arrays allocated once per block and aligned to `HOST_ALIGNMENT`; each
  batch is a view of them. The values
  are the same either way. What the blocks are for: on the CPU the training
  loop keeps its freed heap (train/host_memory.py), and a step's
  temporaries come back as one large block each step; host arrays made for
  every step land against that block's edges and leave its hole too small
  for the next step, so the heap grows by a step's temporaries at a time
  (docs/speed.md, "Host memory"). In blocks, the host allocates for the
  batches once every few dozen steps, and the CPU client takes each aligned
  batch without a copy: the affNIST CapsNet's heap no longer jumped in its
  first epoch (0 of 4 runs, 4 of 6 before). It did not keep the baseline
  CNN's 3.2 GB block in place (the heap jumped in 8 of 9 runs however its
  batches were made); blocks that large are mapped apart from the heap
  instead where huge pages allow (train/host_memory.py).
  """
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    if block_bytes <= 0:
      yield batch_of_step(step)
      step += 1
      continue
    first = batch_of_step(step)
    batch_bytes = sum(value.nbytes for value in first.values())
    count = max(1, min(MAX_BLOCK_STEPS, block_bytes // max(batch_bytes, 1)))
    if num_steps is not None:
      count = min(count, start_step + num_steps - step)
    block = [{} for _ in range(count)]
    for name, value in first.items():
      # Each batch's array starts aligned: its slot rounded up.
      slot = -(-value.nbytes // HOST_ALIGNMENT) * HOST_ALIGNMENT
      memory = aligned_empty((count * slot,), np.uint8)
      for index in range(count):
        block[index][name] = memory[index * slot:index * slot + value.nbytes
                                    ].view(value.dtype).reshape(value.shape)
    for index in range(count):
      batch = first if index == 0 else batch_of_step(step + index)
      for name, value in batch.items():
        block[index][name][...] = value
    del first, batch
    for index in range(count):
      yield block[index]
      block[index] = None  # Kept no longer than the loop keeps it.
    step += count


# ---------------------------------------------------------------------------
# Evaluation batches.


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Batches `eval_batches` yields: ceil(num_examples / batch_size)."""
  return -(-num_examples // batch_size)


def pad_batch(batch: Batch, size: int) -> Batch:
  """Every array padded with zero rows to `size`, and a float32 `mask`: 1.0
  for the real rows, 0.0 for the padding."""
  num_real = len(next(iter(batch.values())))
  padded = {name: np.concatenate(
      [value, np.zeros((size - num_real, *value.shape[1:]), value.dtype)])
            for name, value in batch.items()}
  padded['mask'] = (np.arange(size) < num_real).astype(np.float32)
  return padded


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Yields every example once, in order, in batches of a fixed shape.

  The last global batch is padded (`pad_batch`). Each process gets its
  contiguous slice of each global batch (so every process yields the same
  number of batches). No augmentation.
  """
  rows_of_host = host_rows(batch_size, process_index, process_count)
  for batch_index in range(num_eval_batches(len(labels), batch_size)):
    start = batch_index * batch_size
    batch = pad_batch({'image': images[start:start + batch_size],
                       'label': labels[start:start + batch_size]}, batch_size)
    yield {name: value[rows_of_host] for name, value in batch.items()}


def stack_size(num_examples: int, batch_size: int, per_stack: int) -> int:
  """`per_stack`, but no more than the evaluation batches of
  `num_examples` (a small set is not padded to a large stack), and >= 1."""
  return max(1, min(per_stack, num_eval_batches(num_examples, batch_size)))


def stacked_batches(batches: Iterable[Batch], per_stack: int
                    ) -> Iterator[Batch]:
  """`per_stack` consecutive evaluation batches at a time, every array
  stacked to `(per_stack, batch, ...)`.

  The last stack is completed with batches of zeros, whose `mask` of 0
  leaves them out of every metric; so every stack has the same shape (one
  compilation).
  """
  if per_stack < 1:
    raise ValueError(f'per_stack must be >= 1, not {per_stack}')
  iterator = iter(batches)
  while group := list(itertools.islice(iterator, per_stack)):
    if 'mask' not in group[0]:
      raise ValueError('stacked_batches needs evaluation batches, with a '
                       "'mask' (pad_batch)")
    padding = {name: np.zeros_like(value) for name, value in group[0].items()}
    group += [padding] * (per_stack - len(group))
    yield {name: np.stack([batch[name] for batch in group])
           for name in group[0]}


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """A fixed evaluation set of arrays; `multimnist.PairSet` is the other
  kind, with the same three methods."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def batches(self, batch_size: int, process_index: int = 0,
              process_count: int = 1) -> Iterator[Batch]:
    return eval_batches(self.images, self.labels, batch_size, process_index,
                        process_count)

  def first(self, count: int) -> Batch:
    return {'image': self.images[:count], 'label': self.labels[:count]}


# ---------------------------------------------------------------------------
# Prefetching.


class _Raised:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _put_unless_stopped(items: queue.Queue, stop: threading.Event,
                        item: Any) -> bool:
  """Queues item; False if `stop` was set before there was room."""
  while not stop.is_set():
    try:
      items.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(iterator: Iterable[Any], items: queue.Queue,
             stop: threading.Event) -> None:
  """The prefetch thread: queues the items, then _END or the error."""
  try:
    for item in iterator:
      if not _put_unless_stopped(items, stop, item):
        return
  except BaseException as error:  # pylint: disable=broad-except
    _put_unless_stopped(items, stop, _Raised(error))
    return
  _put_unless_stopped(items, stop, _END)


class Prefetcher(Iterator[Any]):
  """Iterates over `iterator` with up to `size` items made ahead in a thread.

  The thread starts at once, so the first items are ready by the time they
  are asked for. An exception raised by `iterator` is re-raised by `next`.
  `close()`, or dropping the last reference to the prefetcher, stops the
  thread (it holds no reference to the prefetcher).
  """

  def __init__(self, iterator: Iterable[Any], size: int = 2):
    self._items: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce, args=(iterator, self._items, self._stop),
        name='prefetch', daemon=True)
    self._thread.start()

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item = self._items.get()
    if item is _END or isinstance(item, _Raised):
      self.close()
      if isinstance(item, _Raised):
        raise item.error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the producer thread; `next` then stops the iteration."""
    self._done = True
    self._stop.set()

  def __del__(self):
    self._stop.set()


def prefetch(iterator: Iterable[Any], size: int = 2) -> Prefetcher:
  """Items of `iterator`, produced up to `size` ahead in a background thread.

  Use it to overlap host-side batch preparation with device compute, e.g.
  `for batch in prefetch(batches_of_steps(batch_of_step, start_step)):`.
  """
  return Prefetcher(iterator, size)
