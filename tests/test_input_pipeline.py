"""Tests of the numpy input pipeline (train/input_pipeline)."""

import sys
import threading
import time

import numpy as np
import pytest

from train import datasets
from train import batching
from train import tfds_builders
from train import tfds_splits
from train.datasets import DataError

TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def id_dataset(num_examples: int = 103, size: int = 6):
  """Images whose pixels all hold their index (mod 256); labels = index."""
  ids = np.arange(num_examples)
  images = np.broadcast_to((ids % 256)[:, None, None, None],
                           (num_examples, size, size, 1)).astype(np.float32)
  return images, ids.astype(np.int32)


# ---------------------------------------------------------------------------
# load_splits on the real MNIST.


def test_split_sizes_and_types(mnist_splits):
  expected_sizes = {'train': 55000, 'validation': 5000, 'test': 10000}
  for split, size in expected_sizes.items():
    images = getattr(mnist_splits, f'{split}_images')
    labels = getattr(mnist_splits, f'{split}_labels')
    assert images.shape == (size, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (size,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    assert labels.min() == 0 and labels.max() == 9


def test_tensorflow_is_not_needed(mnist_splits):
  del mnist_splits  # Prepared and read by now.
  assert 'tensorflow' not in sys.modules


def test_test_split_class_counts(mnist_splits):
  assert np.bincount(mnist_splits.test_labels).tolist() == TEST_CLASS_COUNTS


def test_splits_keep_the_original_order(mnist_splits, mnist_idx_dir):
  """validation is the tail of the official train set, test is t10k."""
  train_images, train_labels = datasets.read_idx_split(
      mnist_idx_dir / 'train-images-idx3-ubyte.gz',
      mnist_idx_dir / 'train-labels-idx1-ubyte.gz')
  np.testing.assert_array_equal(mnist_splits.validation_labels,
                                train_labels[-5000:])
  np.testing.assert_array_equal(mnist_splits.train_labels,
                                train_labels[:-5000])
  np.testing.assert_array_equal(
      mnist_splits.validation_images[..., 0],
      train_images[-5000:].astype(np.float32) / 255)
  test_labels = datasets.read_idx(mnist_idx_dir / 't10k-labels-idx1-ubyte.gz')
  np.testing.assert_array_equal(mnist_splits.test_labels, test_labels)


def test_second_load_does_not_prepare_again(mnist_splits, mnist_idx_dir,
                                            mnist_tfds_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('prepared again')
  # The given IDX files are verified on every run; preparing is once.
  monkeypatch.setattr(tfds_builders.CapsjaxMnist, 'download_and_prepare', fail)
  splits = tfds_splits.load_splits(
      'mnist', str(mnist_idx_dir), str(mnist_tfds_dir),
      validation_size=10000)
  assert len(splits.train_labels) == 50000
  np.testing.assert_array_equal(splits.test_labels, mnist_splits.test_labels)


def test_fast_parsing_matches_tfds_decoding(mnist_tfds_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builders.CapsjaxMnist(data_dir=str(mnist_tfds_dir))
  raw = tfds.data_source(
      builder.name, split='test', data_dir=str(mnist_tfds_dir),
      download=False,
      deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  records = raw.__getitems__(range(0, 10000, 7))
  features = builder.info.features
  fast = tfds_splits._parse_records_fast(records)  # pylint: disable=protected-access
  slow = tfds_splits._parse_records_with_tfds(  # pylint: disable=protected-access
      records, features)
  for fast_array, slow_array in zip(fast, slow):
    np.testing.assert_array_equal(fast_array, slow_array)


def test_unknown_dataset_is_named():
  with pytest.raises(DataError, match='kmnist'):
    tfds_splits.load_splits('kmnist', None, '/tmp/unused')


def test_missing_explicit_data_dir_is_named(tmp_path):
  missing = tmp_path / 'no_such_dir'
  with pytest.raises(DataError, match='no_such_dir'):
    tfds_splits.load_splits('mnist', str(missing), str(tmp_path / 'tfds'))


def test_default_data_dir_is_shared_copy_else_download(tmp_path, monkeypatch):
  for empty in (None, ''):
    assert tfds_splits.resolve_idx_dir('mnist', empty) == tfds_splits.default_idx_dir('mnist')
  (tmp_path / 'mnist').mkdir()
  monkeypatch.setattr(tfds_splits, 'SHARED_DATA_DIR', tmp_path)
  assert tfds_splits.resolve_idx_dir('mnist', None) == tmp_path / 'mnist'
  assert tfds_splits.resolve_idx_dir('fashion_mnist', None) is None  # Download.


# ---------------------------------------------------------------------------
# Random shifts.


def random_shift(images, rng, max_shift=2):
  return batching.shift_images(
      images, batching.sample_shifts(rng, len(images), max_shift))


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Reference: image moved down dy and right dx, zeros where vacated."""
  out = np.zeros_like(image)
  height, width = image.shape[:2]
  out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = (
      image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)])
  return out


def random_images(num_images=64, size=10, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(0.1, 1.0, (num_images, size, size, 1)).astype(np.float32)


def test_shift_zero_is_identity():
  images = random_images()
  out = random_shift(images, np.random.default_rng(0), max_shift=0)
  np.testing.assert_array_equal(out, images)


def test_shift_matches_reference_and_uses_the_whole_range():
  images = random_images(num_images=400)
  out = random_shift(images, np.random.default_rng(1), max_shift=2)
  used = set()
  for image, result in zip(images, out):
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(result, shifted(image, dy, dx))]
    assert len(matches) == 1  # Pixels are > 0, so the shift is unique.
    used.add(matches[0])
  assert len(used) == 25


def test_shift_is_deterministic_for_a_seed():
  images = random_images()
  first = random_shift(images, np.random.default_rng(7))
  second = random_shift(images, np.random.default_rng(7))
  other = random_shift(images, np.random.default_rng(8))
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other)


def test_shift_images_on_unbatched_channels_and_2d():
  images = random_images(num_images=3)[..., 0]  # (N, H, W)
  shifts = np.array([[1, 0], [0, -2], [-1, 1]])
  out = batching.shift_images(images, shifts)
  for image, (dy, dx), result in zip(images, shifts, out):
    np.testing.assert_array_equal(result, shifted(image, dy, dx))


def _bilinear_reference(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
  """out[y, x] = image at (y - dy, x - dx), bilinear, zero outside; loops."""
  height, width = image.shape[:2]
  out = np.zeros_like(image, dtype=np.float64)
  for y in range(height):
    for x in range(width):
      source_y, source_x = y - dy, x - dx
      y0, x0 = int(np.floor(source_y)), int(np.floor(source_x))
      for row, weight_y in ((y0, 1 - (source_y - y0)), (y0 + 1, source_y - y0)):
        for col, weight_x in ((x0, 1 - (source_x - x0)),
                              (x0 + 1, source_x - x0)):
          if 0 <= row < height and 0 <= col < width:
            out[y, x] += weight_y * weight_x * image[row, col]
  return out


def test_bilinear_shifts_match_a_loop_transcription():
  images = random_images(num_images=6, size=7)
  shifts = np.array([[0.5, -0.25], [-1.75, 2.8], [2.8, -2.8], [0.0, 0.0],
                     [-0.1, 1.9], [1.0, -2.0]])
  out = batching.shift_images_bilinear(images, shifts)
  assert out.dtype == images.dtype and out.shape == images.shape
  for image, (dy, dx), result in zip(images, shifts, out):
    np.testing.assert_allclose(result, _bilinear_reference(image, dy, dx),
                               atol=1e-6)


def test_bilinear_shifts_by_whole_pixels_are_the_whole_pixel_shifts():
  images = random_images(num_images=30)
  shifts = batching.sample_shifts(np.random.default_rng(3), 30, 2)
  np.testing.assert_array_equal(
      batching.shift_images_bilinear(images, shifts.astype(np.float64)),
      batching.shift_images(images, shifts))


def test_subpixel_shifts_are_real_and_keep_an_interior_digit_s_ink():
  shifts = batching.sample_shifts(np.random.default_rng(0), 2000, 2.8,
                                  subpixel=True)
  assert shifts.dtype == np.float64
  assert -2.8 <= shifts.min() < -2.7 and 2.7 < shifts.max() <= 2.8
  assert len(np.unique(shifts)) == shifts.size  # not whole pixels
  # A digit with 3 empty pixels on every side loses no ink to the border:
  # bilinear interpolation only spreads it.
  image = np.zeros((1, 14, 14, 1), np.float32)
  image[0, 3:11, 3:11] = random_images(num_images=1, size=8)[0]
  for shift in shifts[:50]:
    moved = batching.shift_images_bilinear(image, shift[None])
    np.testing.assert_allclose(moved.sum(), image.sum(), rtol=1e-5)


def test_train_batch_with_subpixel_shifts_is_a_function_of_seed_and_step():
  data = id_dataset()
  kwargs = dict(step=3, batch_size=10, seed=1, max_shift=2.8,
                subpixel_shifts=True)
  first = batching.train_batch(data, **kwargs)
  np.testing.assert_array_equal(first['image'],
                                batching.train_batch(data, **kwargs)['image'])
  whole = batching.train_batch(data, step=3, batch_size=10, seed=1)
  np.testing.assert_array_equal(first['label'], whole['label'])
  assert first['image'].dtype == np.float32
  assert not np.array_equal(first['image'], whole['image'])


# ---------------------------------------------------------------------------
# train_batch.


def test_steps_per_epoch_drops_the_partial_batch():
  assert batching.steps_per_epoch(103, 10) == 10
  assert batching.steps_per_epoch(100, 10) == 10
  with pytest.raises(ValueError):
    batching.steps_per_epoch(5, 10)


def test_train_batch_is_a_function_of_seed_and_step():
  data = id_dataset()
  first = batching.train_batch(data, step=3, batch_size=10, seed=1)
  again = batching.train_batch(data, step=3, batch_size=10, seed=1)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(first[key], again[key])
  other_seed = batching.train_batch(data, step=3, batch_size=10, seed=2)
  other_step = batching.train_batch(data, step=4, batch_size=10, seed=1)
  assert not np.array_equal(first['label'], other_seed['label'])
  assert not np.array_equal(first['label'], other_step['label'])
  assert first['image'].dtype == np.float32
  assert first['label'].dtype == np.int32


def test_steps_of_an_epoch_are_disjoint():
  data = id_dataset(num_examples=103)
  labels = [batching.train_batch(data, step, batch_size=10, seed=0,
                           max_shift=0)['label'] for step in range(10)]
  seen = np.concatenate(labels)
  assert len(np.unique(seen)) == 100  # 10 steps x 10, none repeated.


def test_batch_rows_are_the_images_of_their_labels():
  images, labels = id_dataset()
  batch = batching.train_batch((images, labels), step=2, batch_size=16, seed=0,
                         max_shift=0)
  np.testing.assert_array_equal(batch['image'], images[batch['label']])


def test_process_slices_make_up_the_global_batch():
  data = id_dataset()
  for step in (0, 11):
    whole = batching.train_batch(data, step, batch_size=16, seed=5)
    parts = [batching.train_batch(data, step, batch_size=16, seed=5,
                            process_index=p, process_count=2)
             for p in range(2)]
    for key in ('image', 'label'):
      assert parts[0][key].shape[0] == 8
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in parts]), whole[key])


def test_epoch_boundary():
  data = id_dataset(num_examples=103)
  steps = batching.steps_per_epoch(103, 10)
  epoch_0 = np.concatenate([
      batching.train_batch(data, s, 10, seed=0)['label'] for s in range(steps)])
  epoch_1 = np.concatenate([
      batching.train_batch(data, s, 10, seed=0)['label']
      for s in range(steps, 2 * steps)])
  assert len(np.unique(epoch_0)) == len(np.unique(epoch_1)) == 100
  assert not np.array_equal(epoch_0, epoch_1)  # A new permutation.
  # Going back to an earlier epoch gives the same batch again (resume).
  np.testing.assert_array_equal(
      batching.train_batch(data, 0, 10, seed=0)['label'], epoch_0[:10])


def test_train_batch_checks_process_split():
  with pytest.raises(ValueError, match='divide'):
    batching.train_batch(id_dataset(), 0, batch_size=10, seed=0, process_count=3)


def test_train_batch_on_real_splits(mnist_splits):
  batch = batching.train_batch(
      (mnist_splits.train_images, mnist_splits.train_labels), step=1000,
      batch_size=128, seed=0)
  assert batch['image'].shape == (128, 28, 28, 1)
  assert batch['label'].shape == (128,)
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0


def test_train_batches_iterates_steps():
  data = id_dataset()
  batches = list(batching.batches_of_steps(
      lambda step: batching.train_batch(data, step, 10, seed=0),
      start_step=4, num_steps=3))
  assert len(batches) == 3
  np.testing.assert_array_equal(
      batches[2]['label'], batching.train_batch(data, 6, 10, seed=0)['label'])


@pytest.mark.parametrize('num_steps', [7, 3, 1])
def test_batches_in_blocks_are_the_same_batches(num_steps):
  """Blocks of 3 batches (the bytes of 3) give every step's batch, the last
  block cut short at num_steps, each batch a 64-byte-aligned view."""
  data = id_dataset()
  batch_of_step = lambda step: batching.train_batch(data, step, 10, seed=0)
  batch_bytes = sum(value.nbytes for value in batch_of_step(0).values())
  blocks = list(batching.batches_of_steps(
      batch_of_step, start_step=4, num_steps=num_steps,
      block_bytes=3 * batch_bytes + 1))
  one_at_a_time = list(batching.batches_of_steps(
      batch_of_step, start_step=4, num_steps=num_steps))
  assert len(blocks) == len(one_at_a_time) == num_steps
  for blocked, single in zip(blocks, one_at_a_time):
    assert blocked.keys() == single.keys()
    for name, value in single.items():
      np.testing.assert_array_equal(blocked[name], value)
      assert blocked[name].dtype == value.dtype
      assert blocked[name].ctypes.data % batching.HOST_ALIGNMENT == 0
  # Three batches share one block.
  if num_steps >= 3:
    assert blocks[0]['image'].base is blocks[2]['image'].base
  if num_steps > 3:
    assert blocks[3]['image'].base is not blocks[2]['image'].base


def test_batches_in_blocks_forever():
  data = id_dataset()
  batches = batching.batches_of_steps(
      lambda step: batching.train_batch(data, step, 10, seed=0),
      start_step=2, block_bytes=1)  # Smaller than a batch: one a block.
  labels = [next(batches)['label'] for _ in range(4)]
  for offset, label in enumerate(labels):
    np.testing.assert_array_equal(
        label, batching.train_batch(data, 2 + offset, 10, seed=0)['label'])


def test_aligned_empty():
  for shape, dtype in (((3, 5), np.float32), ((7,), np.int32),
                       ((2, 3), np.uint8)):
    array = batching.aligned_empty(shape, dtype)
    assert array.shape == shape and array.dtype == dtype
    assert array.ctypes.data % batching.HOST_ALIGNMENT == 0
    assert array.flags.c_contiguous and array.flags.writeable


def test_an_aligned_batch_reaches_the_cpu_without_a_copy():
  """What the blocks rely on: the CPU client takes an aligned host array as
  it is (the same memory), so the loop allocates nothing per step for it."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('the host-memory aliasing is the CPU client\'s')
  host = batching.aligned_empty((128, 40, 40, 1), np.float32)
  host[...] = 0.5
  device = jax.device_put(host, jax.devices('cpu')[0])
  assert device.unsafe_buffer_pointer() == host.ctypes.data


# ---------------------------------------------------------------------------
# eval_batches.


@pytest.mark.parametrize('batch_size', [16, 103, 200])
def test_eval_batches_cover_everything_once(batch_size):
  images, labels = id_dataset(num_examples=103)
  batches = list(batching.eval_batches(images, labels, batch_size))
  assert len(batches) == batching.num_eval_batches(103, batch_size)
  for batch in batches:
    assert batch['image'].shape == (batch_size, 6, 6, 1)
    assert batch['mask'].dtype == np.float32
  mask = np.concatenate([batch['mask'] for batch in batches])
  real = np.concatenate([batch['label'] for batch in batches])[mask == 1]
  assert mask.sum() == 103
  np.testing.assert_array_equal(real, labels)
  last = batches[-1]
  num_pad = batch_size - (103 - (len(batches) - 1) * batch_size)
  if num_pad:
    assert not last['image'][-num_pad:].any()
    assert not last['mask'][-num_pad:].any()


def test_eval_process_slices_make_up_the_batches():
  images, labels = id_dataset(num_examples=103)
  whole = list(batching.eval_batches(images, labels, 16))
  hosts = [list(batching.eval_batches(images, labels, 16, p, 2)) for p in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(whole)
  for index, batch in enumerate(whole):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([host[index][key] for host in hosts]), batch[key])


@pytest.mark.parametrize('per_stack', [1, 3, 7, 20])
def test_stacked_batches_keep_every_example_once_in_order(per_stack):
  images, labels = id_dataset(num_examples=103)
  batches = list(batching.eval_batches(images, labels, 16))  # 7 batches
  stacks = list(batching.stacked_batches(batches, per_stack))
  assert len(stacks) == -(-len(batches) // per_stack)
  for stack in stacks:
    assert stack['image'].shape == (per_stack, 16, 6, 6, 1)
    assert stack['label'].shape == stack['mask'].shape == (per_stack, 16)
  mask = np.concatenate([stack['mask'].ravel() for stack in stacks])
  real = np.concatenate([stack['label'].ravel() for stack in stacks])
  np.testing.assert_array_equal(real[mask == 1], labels)
  # The completing batches are all padding.
  padding = len(stacks) * per_stack - len(batches)
  if padding:
    assert not stacks[-1]['mask'][-padding:].any()
    assert not stacks[-1]['image'][-padding:].any()


def test_stacked_batches_refuse_training_batches_and_empty_stacks():
  images, labels = id_dataset(num_examples=32)
  with pytest.raises(ValueError, match='mask'):
    list(batching.stacked_batches([{'image': images, 'label': labels}], 2))
  with pytest.raises(ValueError, match='per_stack'):
    list(batching.stacked_batches(
        batching.eval_batches(images, labels, 16), 0))


# ---------------------------------------------------------------------------
# prefetch.


def test_prefetch_yields_everything_in_order():
  assert list(batching.prefetch(iter(range(50)), size=3)) == list(range(50))


def test_prefetch_reraises_errors():
  def broken():
    yield 1
    raise RuntimeError('boom')
  iterator = batching.prefetch(broken())
  assert next(iterator) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(iterator)


def test_prefetch_runs_ahead_and_stops_when_closed():
  produced = []

  def counting():
    for item in range(1000):
      produced.append(item)
      yield item

  threads_before = threading.active_count()
  iterator = batching.prefetch(counting(), size=2)
  deadline = time.monotonic() + 5
  while len(produced) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  assert 2 <= len(produced) <= 4  # Ahead by the queue size, no further.
  assert next(iterator) == 0
  iterator.close()
  deadline = time.monotonic() + 5
  while threading.active_count() > threads_before and (
      time.monotonic() < deadline):
    time.sleep(0.01)
  assert threading.active_count() == threads_before
  assert len(produced) < 10


def test_prefetch_thread_stops_when_dropped():
  threads_before = threading.active_count()
  iterator = batching.prefetch(iter(range(1000)), size=2)
  assert next(iterator) == 0
  del iterator
  deadline = time.monotonic() + 5
  while threading.active_count() > threads_before and (
      time.monotonic() < deadline):
    time.sleep(0.01)
  assert threading.active_count() == threads_before
