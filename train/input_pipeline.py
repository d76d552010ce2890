"""The one place that knows the training program's datasets.

`DATASETS` maps `config.dataset` to what the program needs of it: which
files it is made from, the model's input shape, its training batch of a step
and its fixed evaluation sets. Adding a dataset is adding a row.

  'mnist', 'fashion_mnist': the official splits (`train/tfds_splits.py`),
    the last `validation_size` training examples held out for validation
    (0: none, every training example is trained on); training images
    shifted by up to `max_shift` pixels.
  'multimnist': pairs of overlapping MNIST digits (`train/multimnist.py`).
  'affnist': the affNIST protocol on MNIST (`train/affnist.py`).

Every training batch is a pure function of (seed, step) (see
`train/batching.py`), so resuming needs only the step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

from train import affnist
from train import batching
from train import datasets
from train import multimnist
from train import tfds_splits

Arrays = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A row of `DATASETS`.

  Attributes:
    files: the dataset whose files are read (`tfds_splits.load_splits`).
    image_shape: config -> the model's input shape.
    train_batch: (config, (images, labels) of the training split, step,
      process_index, process_count) -> this process's part of the step's
      global batch.
    eval_sets: (config, validation arrays, test arrays, limit) -> the fixed
      validation and test sets (`batching.Examples` or `multimnist.PairSet`).
    config_problems: config -> (field, message) of each impossible setting.
    settings: the config section the dataset needs, if any.
    trains_without_validation: whether `validation_size=0` (train on every
      training example, test the last checkpoint) is possible: not where the
      validation set is made from the held-out digits.
  """

  files: str
  image_shape: Callable[[ml_collections.ConfigDict], tuple[int, ...]]
  train_batch: Callable[..., batching.Batch]
  eval_sets: Callable[..., tuple[Any, Any]]
  config_problems: Callable[[ml_collections.ConfigDict],
                            list[tuple[str, str]]] = lambda config: []
  settings: str | None = None
  trains_without_validation: bool = True


def _digits_image_shape(config: ml_collections.ConfigDict):
  del config
  return (datasets.IMAGE_SIZE, datasets.IMAGE_SIZE, 1)


def _digits_train_batch(config: ml_collections.ConfigDict, data: Arrays,
                        step: int, process_index: int,
                        process_count: int) -> batching.Batch:
  return batching.train_batch(data, step, config.batch_size, config.seed,
                              process_index, process_count,
                              max_shift=config.max_shift,
                              subpixel_shifts=subpixel_shifts(config))


def subpixel_shifts(config: ml_collections.ConfigDict | dict[str, Any]
                    ) -> bool:
  # A ConfigDict or a saved config.json (before the field: whole pixels).
  return config.get('subpixel_shifts', False)


def _digits_eval_sets(config: ml_collections.ConfigDict, validation: Arrays,
                      test: Arrays, limit: int):
  del config, limit  # The arrays are limited already.
  return batching.Examples(*validation), batching.Examples(*test)


_DIGITS = dict(image_shape=_digits_image_shape,
               train_batch=_digits_train_batch, eval_sets=_digits_eval_sets)
DATASETS = {
    'mnist': Dataset('mnist', **_DIGITS),
    'fashion_mnist': Dataset('fashion_mnist', **_DIGITS),
    'multimnist': Dataset('mnist', multimnist.image_shape,
                          multimnist.config_train_batch, multimnist.eval_sets,
                          multimnist.config_problems, settings='multimnist',
                          trains_without_validation=False),
    'affnist': Dataset('mnist', affnist.image_shape,
                       affnist.config_train_batch, affnist.eval_sets,
                       affnist.config_problems, settings='affnist',
                       trains_without_validation=False),
}


def config_problems(config: ml_collections.ConfigDict
                    ) -> list[tuple[str, str]]:
  """(field, message) of each impossible setting of the data."""
  if config.dataset not in DATASETS:  # Checked first: the rest needs it.
    return [('dataset', f'must be one of {tuple(DATASETS)}')]
  dataset = DATASETS[config.dataset]
  if dataset.settings and dataset.settings not in config:
    return [('dataset', f'needs the {dataset.settings} settings: use '
             f'--config=train/configs/{dataset.settings}.py')]
  official = _official_train_size(config)
  validation_size = config.get('validation_size', 5000)
  if not (isinstance(validation_size, int) and
          0 <= validation_size < official):
    return [('validation_size', f'must be an integer in [0, {official}) '
             f'(the {official} official training examples of '
             f'{dataset.files})')]
  if validation_size == 0 and config.get('stop_at_validation_accuracy', 0.0):
    return [('stop_at_validation_accuracy', 'needs a validation split '
             '(config.validation_size is 0)')]
  if validation_size == 0 and not dataset.trains_without_validation:
    return [('validation_size', f'must be >= 1 for {config.dataset}: its '
             'validation set is made from the held-out training digits')]
  if subpixel_shifts(config) not in (True, False):
    return [('subpixel_shifts', 'must be True or False')]
  if subpixel_shifts(config) and dataset.settings:
    return [('subpixel_shifts', f'is for mnist and fashion_mnist; '
             f'{config.dataset} places its digits by whole pixels')]
  if (not subpixel_shifts(config)
      and not float(config.max_shift).is_integer()):
    return [('max_shift', 'must be a whole number of pixels (or set '
             'subpixel_shifts=True for real shifts)')]
  return dataset.config_problems(config)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The model's input shape."""
  return tuple(DATASETS[config.dataset].image_shape(config))


def num_train_examples(config: ml_collections.ConfigDict) -> int:
  """How many training examples the run uses (an epoch's)."""
  if config.num_train_examples > 0:
    return config.num_train_examples
  return _official_train_size(config) - config.get('validation_size', 5000)


def _official_train_size(config: ml_collections.ConfigDict) -> int:
  files = DATASETS[config.dataset].files
  return datasets.KNOWN_IDX_FILES[files]['train_images'].shape[0]


def load_source_splits(config: ml_collections.ConfigDict
                       ) -> tfds_splits.Splits:
  """The splits of the files behind config.dataset (MNIST for MultiMNIST
  and affNIST), prepared with tfds on first use."""
  return tfds_splits.load_splits(
      DATASETS[config.dataset].files, config.data_dir,
      os.path.expanduser(config.tfds_data_dir),
      config.get('validation_size', 5000))


def _first(arrays: Arrays, limit: int) -> Arrays:
  return arrays if limit <= 0 else (arrays[0][:limit], arrays[1][:limit])


def training_data(config: ml_collections.ConfigDict,
                  splits: tfds_splits.Splits):
  """(train arrays, validation set, test set) as the training loop uses
  them, limited to config.num_train_examples / num_eval_examples."""
  train = _first((splits.train_images, splits.train_labels),
                 config.num_train_examples)
  validation, test = DATASETS[config.dataset].eval_sets(
      config,
      _first((splits.validation_images, splits.validation_labels),
             config.num_eval_examples),
      _first((splits.test_images, splits.test_labels),
             config.num_eval_examples),
      config.num_eval_examples)
  return train, validation, test


def train_batches(config: ml_collections.ConfigDict, train: Arrays,
                  start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[batching.Batch]:
  """This process's training batches of steps start_step, ..., made ahead
  in a background thread (close it when done), a block of them at a time
  (`batching.batches_of_steps`)."""
  train_batch = DATASETS[config.dataset].train_batch
  return batching.prefetch(batching.batches_of_steps(
      lambda step: train_batch(config, train, step, process_index,
                               process_count),
      start_step, num_steps, block_bytes=batching.BLOCK_BYTES))
