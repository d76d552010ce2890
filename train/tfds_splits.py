"""MNIST and Fashion-MNIST as numpy splits, through tfds.

`load_splits` prepares the dataset with our tfds builder
(`train/tfds_builders.py`, once) and reads it whole into numpy arrays with
`tfds.data_source`: MNIST is 50 MB as uint8, so there is nothing to stream.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from google.protobuf import message as protobuf_message
from tensorflow_datasets.proto import tf_example_pb2

from train import datasets
from train import tfds_builders
from train.datasets import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / 'shared' / 'data'


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """The three splits: images (N, 28, 28, 1) float32 in [0, 1], labels int32.

  validation is a fixed hold-out: the last examples of the official train
  set. test is the official test set.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  validation_images: np.ndarray
  validation_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


# ---------------------------------------------------------------------------
# Loading.


def default_idx_dir(dataset: str) -> Path | None:
  """`<repo>/../shared/data/<dataset>` if it exists, else None (download)."""
  candidate = SHARED_DATA_DIR / dataset
  return candidate if candidate.is_dir() else None


def resolve_idx_dir(dataset: str, data_dir: str | None) -> Path | None:
  """The folder of the IDX files to prepare from; None means download.

  An empty `data_dir` means the shared copy if there is one. An explicit
  `data_dir` must exist.
  """
  if not data_dir:
    return default_idx_dir(dataset)
  idx_dir = Path(data_dir).expanduser()
  if not idx_dir.is_dir():
    raise DataError(f'{idx_dir}: data_dir does not exist or is not a folder')
  return idx_dir


def load_splits(dataset: str, data_dir: str | None, tfds_data_dir: str,
                validation_size: int = 5000) -> Splits:
  """Prepares `dataset` once with tfds and returns its splits as arrays.

  Args:
    dataset: 'mnist' or 'fashion_mnist'.
    data_dir: folder of the four original IDX files; None or '' for the
      shared copy next to the repo, or a download if there is none.
    tfds_data_dir: where tfds keeps the prepared dataset (reused if there).
    validation_size: how many of the last official training examples to hold
      out as the validation split.
  """
  datasets.check_dataset_name(dataset)
  num_official_train = (
      datasets.KNOWN_IDX_FILES[dataset]['train_images'].shape[0])
  if not 0 <= validation_size < num_official_train:
    raise DataError(f'validation_size {validation_size} must be in '
                    f'[0, {num_official_train})')
  idx_dir = resolve_idx_dir(dataset, data_dir)
  builder = tfds_builders.prepare(dataset, tfds_data_dir, idx_dir)
  sources = tfds.data_source(
      builder.name, data_dir=os.fspath(tfds_data_dir), download=False,
      deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  features = builder.info.features
  train_images, train_labels = read_data_source(sources['train'], features)
  test_images, test_labels = read_data_source(sources['test'], features)
  num_train = len(train_labels) - validation_size
  return Splits(
      train_images=train_images[:num_train],
      train_labels=train_labels[:num_train],
      validation_images=train_images[num_train:],
      validation_labels=train_labels[num_train:],
      test_images=test_images,
      test_labels=test_labels,
  )


def read_data_source(raw_source: Any, features: Any
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split: float32 images in [0, 1], int32 labels.

  `raw_source` is a `tfds.data_source` opened with `RAW_BYTES`; `features`
  the dataset's `FeaturesDict`. The records are parsed in bulk straight from
  their `tf.train.Example` protos (5x faster than tfds's generic per-record
  decoding), checked against tfds's own decoding of the first and last
  record, and decoded the generic way if that check fails.
  """
  records = raw_source.__getitems__(range(len(raw_source)))
  try:
    images, labels = _parse_records_fast(records)
    _check_against_tfds(records, features, images, labels)
  except (KeyError, IndexError, ValueError,
          protobuf_message.DecodeError) as error:
    logging.warning('Fast record parsing failed (%s); using tfds decoding.',
                    error)
    images, labels = _parse_records_with_tfds(records, features)
  return to_float_images(images), labels.astype(np.int32)


def _parse_records_fast(records: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Serialized examples -> uint8 images, int64 labels, with protobuf only."""
  examples = [tf_example_pb2.Example.FromString(record).features.feature
              for record in records]
  image_bytes = b''.join(
      example['image'].bytes_list.value[0] for example in examples)
  images = np.frombuffer(image_bytes, np.uint8).reshape(
      len(records), datasets.IMAGE_SIZE, datasets.IMAGE_SIZE, 1)
  labels = np.array([example['label'].int64_list.value[0]
                     for example in examples], np.int64)
  return images, labels


def _parse_records_with_tfds(records: list[bytes], features: Any
                             ) -> tuple[np.ndarray, np.ndarray]:
  """Serialized examples -> uint8 images, int64 labels, the tfds way."""
  examples = [features.deserialize_example_np(record) for record in records]
  images = np.stack([example['image'] for example in examples])
  labels = np.array([example['label'] for example in examples], np.int64)
  return images.reshape(len(records), *images.shape[1:3], 1), labels


def _check_against_tfds(records, features, images, labels) -> None:
  for index in {0, len(records) - 1}:
    example = features.deserialize_example_np(records[index])
    if (not np.array_equal(example['image'].reshape(images[index].shape),
                           images[index])
        or example['label'] != labels[index]):
      raise ValueError(f'record {index} parses differently from tfds')


def to_float_images(images: np.ndarray) -> np.ndarray:
  """uint8 (N, 28, 28[, 1]) -> float32 (N, 28, 28, 1) in [0, 1]."""
  if images.ndim == 3:
    images = images[..., np.newaxis]
  return images.astype(np.float32) / np.float32(255)
