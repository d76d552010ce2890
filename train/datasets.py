"""MNIST and Fashion-MNIST: the original IDX files, parsed and verified.

The original datasets are four gzip-compressed IDX files each. This module
  * knows the exact size and md5 of every original file (`KNOWN_IDX_FILES`),
  * verifies a set of files against that table, raising `DataError` with a
    one-line message naming the file and the problem, and
  * parses IDX files with numpy.

`train/tfds_builders.py` turns verified files into tfds datasets.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x803  # uint8 data, 3 dimensions.
LABELS_MAGIC = 0x801  # uint8 data, 1 dimension.
IMAGE_SIZE = 28
NUM_CLASSES = 10

# File roles, in the order they are checked.
ROLES = ('train_images', 'train_labels', 'test_images', 'test_labels')
SPLIT_ROLES = {
    'train': ('train_images', 'train_labels'),
    'test': ('test_images', 'test_labels'),
}


class DataError(ValueError):
  """A data file is missing, damaged, not the original, or not understood."""


@dataclasses.dataclass(frozen=True)
class IdxFileSpec:
  """What one original IDX file must be."""

  filename: str
  num_bytes: int
  md5: str
  magic: int
  shape: tuple[int, ...]


def _images(filename, num_bytes, md5, count):
  return IdxFileSpec(filename, num_bytes, md5, IMAGES_MAGIC,
                     (count, IMAGE_SIZE, IMAGE_SIZE))


def _labels(filename, num_bytes, md5, count):
  return IdxFileSpec(filename, num_bytes, md5, LABELS_MAGIC, (count,))


# Sizes and md5 of the original files (the md5 sums torchvision checks).
KNOWN_IDX_FILES: dict[str, dict[str, IdxFileSpec]] = {
    'mnist': {
        'train_images': _images('train-images-idx3-ubyte.gz', 9912422,
                                 'f68b3c2dcbeaaa9fbdd348bbdeb94873', 60000),
        'train_labels': _labels('train-labels-idx1-ubyte.gz', 28881,
                                'd53e105ee54ea40749a09fcbcd1e9432', 60000),
        'test_images': _images('t10k-images-idx3-ubyte.gz', 1648877,
                               '9fb629c4189551a2d022fa330f9573f3', 10000),
        'test_labels': _labels('t10k-labels-idx1-ubyte.gz', 4542,
                               'ec29112dd5afa0611ce80d1b7f02629c', 10000),
    },
    'fashion_mnist': {
        'train_images': _images('train-images-idx3-ubyte.gz', 26421880,
                                '8d4fb7e6c68d591d4c3dfef9ec88bf0d', 60000),
        'train_labels': _labels('train-labels-idx1-ubyte.gz', 29515,
                                '25c81989df183df01b3e8a0aad5dffbe', 60000),
        'test_images': _images('t10k-images-idx3-ubyte.gz', 4422102,
                               'bef4ecab320f06d8554ea6380940ec79', 10000),
        'test_labels': _labels('t10k-labels-idx1-ubyte.gz', 5148,
                               'bb300cfdad3c16e7a12a480ee83cd310', 10000),
    },
}


# ---------------------------------------------------------------------------
# IDX parsing.


def _open_gzip(path: Path):
  try:
    return gzip.open(path, 'rb')
  except OSError as e:
    raise DataError(f'{path}: cannot open: {e}') from e


def _gzip_error(path: Path, error: Exception) -> DataError:
  return DataError(f'{path}: corrupt or truncated gzip data ({error})')


def read_idx_header(path: str | os.PathLike,
                    expected_magic: int | None = None) -> tuple[int, ...]:
  """Returns the dimensions in the header of gzip IDX file `path`.

  Reads only the header. Raises `DataError` if the file is not gzip, is cut
  short, or its magic number is not `expected_magic` (when given).
  """
  path = Path(path)
  try:
    with _open_gzip(path) as f:
      magic_bytes = f.read(4)
      if len(magic_bytes) < 4:
        raise DataError(f'{path}: file ends inside the IDX header')
      (magic,) = struct.unpack('>I', magic_bytes)
      if expected_magic is not None and magic != expected_magic:
        raise DataError(f'{path}: bad IDX magic number 0x{magic:08x}, '
                        f'expected 0x{expected_magic:08x}')
      if magic >> 8 != 0x08:  # Only unsigned-byte data is supported.
        raise DataError(f'{path}: bad IDX magic number 0x{magic:08x} '
                        '(not unsigned-byte IDX data)')
      ndim = magic & 0xFF
      dims_bytes = f.read(4 * ndim)
      if len(dims_bytes) < 4 * ndim:
        raise DataError(f'{path}: file ends inside the IDX header')
      return struct.unpack(f'>{ndim}I', dims_bytes)
  except (OSError, EOFError, zlib.error) as e:
    raise _gzip_error(path, e) from e


def read_idx(path: str | os.PathLike,
             expected_magic: int | None = None) -> np.ndarray:
  """Reads gzip IDX file `path` into a uint8 array of the header's shape.

  Raises `DataError` for a bad header, corrupt gzip data, or a payload whose
  length does not match the header's dimensions.
  """
  path = Path(path)
  dims = read_idx_header(path, expected_magic)
  header_bytes = 4 + 4 * len(dims)
  try:
    with _open_gzip(path) as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise _gzip_error(path, e) from e
  expected_bytes = header_bytes + int(np.prod(dims))
  if len(data) != expected_bytes:
    raise DataError(f'{path}: {len(data)} bytes of IDX data, expected '
                    f'{expected_bytes} for dimensions {dims}')
  return np.frombuffer(data, np.uint8, offset=header_bytes).reshape(dims)


def read_idx_split(images_path: str | os.PathLike,
                   labels_path: str | os.PathLike
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Reads an images file and its labels file: (N, 28, 28) and (N,) uint8."""
  images = read_idx(images_path, IMAGES_MAGIC)
  labels = read_idx(labels_path, LABELS_MAGIC)
  _check_image_dims(Path(images_path), images.shape)
  _check_counts_match(Path(images_path), len(images), Path(labels_path),
                      len(labels))
  if labels.size and labels.max() >= NUM_CLASSES:
    raise DataError(f'{labels_path}: label {labels.max()} out of range '
                    f'0..{NUM_CLASSES - 1}')
  return images, labels


# ---------------------------------------------------------------------------
# Verification against the known originals.


def _check_image_dims(path: Path, dims: tuple[int, ...]) -> None:
  if tuple(dims[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
    raise DataError(f'{path}: images are {dims[1:]}, expected '
                    f'({IMAGE_SIZE}, {IMAGE_SIZE})')


def _check_counts_match(images_path: Path, num_images: int,
                        labels_path: Path, num_labels: int) -> None:
  if num_images != num_labels:
    raise DataError(f'{labels_path}: {num_labels} labels, but {images_path} '
                    f'has {num_images} images')


def file_md5(path: str | os.PathLike) -> str:
  """Returns the hex md5 of the file at `path`."""
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def check_dataset_name(dataset: str) -> str:
  """Returns `dataset` if it is one we know, else raises `DataError`."""
  if dataset not in KNOWN_IDX_FILES:
    raise DataError(f'unknown dataset {dataset!r}, expected one of '
                    f'{sorted(KNOWN_IDX_FILES)}')
  return dataset


def idx_paths_in(directory: str | os.PathLike,
                 dataset: str) -> dict[str, Path]:
  """Returns {role: path} of the original file names of `dataset` in dir."""
  specs = KNOWN_IDX_FILES[check_dataset_name(dataset)]
  return {role: Path(directory) / spec.filename for role, spec in specs.items()}


def verify_idx_files(dataset: str,
                     paths: Mapping[str, str | os.PathLike]) -> None:
  """Checks that `paths` ({role: path}) are the original files of `dataset`.

  Checks, in this order: every file exists; its IDX header (magic, image
  size); each split has as many labels as images; each file has the original
  size and md5. The first problem found raises `DataError` naming the file.
  """
  specs = KNOWN_IDX_FILES[check_dataset_name(dataset)]
  paths = {role: Path(paths[role]) for role in ROLES}
  for role in ROLES:
    if not paths[role].is_file():
      raise DataError(f'{paths[role]}: missing ({dataset} {role} file '
                      f'{specs[role].filename})')
  dims = {role: read_idx_header(paths[role], specs[role].magic)
          for role in ROLES}
  for images_role, labels_role in SPLIT_ROLES.values():
    _check_image_dims(paths[images_role], dims[images_role])
    _check_counts_match(paths[images_role], dims[images_role][0],
                        paths[labels_role], dims[labels_role][0])
  for role in ROLES:
    _check_original(paths[role], specs[role])


def _check_original(path: Path, spec: IdxFileSpec) -> None:
  num_bytes = path.stat().st_size
  if num_bytes != spec.num_bytes:
    raise DataError(f'{path}: {num_bytes} bytes, expected {spec.num_bytes} '
                    f'(truncated or not the original {spec.filename})')
  md5 = file_md5(path)
  if md5 != spec.md5:
    raise DataError(f'{path}: md5 {md5} does not match the original '
                    f'{spec.filename} ({spec.md5}): file is corrupt')
