"""The affNIST protocol (paper, section 5.2; train/configs/affnist.py).

Training: MNIST digits centred on a `config.affnist.canvas_size` canvas
(40x40) and shifted by up to `config.max_shift` pixels each way, a pure
function of (seed, step) as every training batch. Validation: the
validation digits on the canvas with fixed random shifts. Test: the affine
test set (`transforms.affine_test_set`) of the test digits at the canvas
size.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from train import batching
from train import transforms

IMAGE_SIZE = 28  # MNIST's digits


def config_problems(config: ml_collections.ConfigDict
                    ) -> list[tuple[str, str]]:
  """(field, message) of each impossible affNIST setting."""
  room = (config.affnist.canvas_size - IMAGE_SIZE) // 2
  if room < 0:
    return [('affnist.canvas_size', f'must be >= {IMAGE_SIZE}')]
  if config.max_shift > room:
    return [('max_shift', f'must be <= {room} to keep the digit on the '
             f'{config.affnist.canvas_size} canvas')]
  return []


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  size = config.affnist.canvas_size
  return (size, size, 1)


def config_train_batch(config: ml_collections.ConfigDict,
                       data: tuple[np.ndarray, np.ndarray], step: int,
                       process_index: int, process_count: int
                       ) -> batching.Batch:
  """MNIST's training batch of `step` without its shifts, centred on the
  canvas and shifted by up to max_shift pixels (rng seeded by (seed, 4,
  step))."""
  batch = batching.train_batch(data, step, config.batch_size, config.seed,
                               process_index, process_count, max_shift=0)
  rows = batching.host_rows(config.batch_size, process_index, process_count)
  shifts = batching.sample_shifts(
      np.random.default_rng([config.seed, 4, step]), config.batch_size,
      config.max_shift)[rows]
  batch['image'] = transforms.to_canvas(batch['image'], shifts,
                                        config.affnist.canvas_size)
  return batch


def affine_ranges(config: ml_collections.ConfigDict
                  ) -> transforms.AffineRanges:
  settings = config.affnist
  return transforms.AffineRanges(
      max_rotation_degrees=settings.max_rotation_degrees,
      max_shear=settings.max_shear, min_scale=settings.min_scale,
      max_scale=settings.max_scale)


def eval_sets(config: ml_collections.ConfigDict, validation, test,
              limit: int) -> tuple[batching.Examples, batching.Examples]:
  """Validation digits on the canvas (fixed shifts), and the affine test
  set; `(images, labels)` each, already limited to `limit` examples."""
  del limit
  settings = config.affnist
  images, labels = validation
  shifts = batching.sample_shifts(
      np.random.default_rng([settings.eval_seed, 6]), len(labels),
      config.max_shift)
  validation = batching.Examples(
      transforms.to_canvas(images, shifts, settings.canvas_size), labels)
  test_images, test_labels, _ = transforms.affine_test_set(
      *test, seed=settings.eval_seed, canvas_size=settings.canvas_size,
      ranges=affine_ranges(config))
  return validation, batching.Examples(test_images, test_labels)
