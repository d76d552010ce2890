"""MNIST and Fashion-MNIST: IDX file verification and our tfds builders.

The original datasets are four gzip-compressed IDX files each. This module
  * knows the exact size and md5 of every original file (`KNOWN_IDX_FILES`),
  * verifies a set of files against that table, raising `DataError` with a
    one-line message naming the file and the problem,
  * parses IDX files with numpy, and
  * defines two tfds builders, `CapsjaxMnist` (`capsjax_mnist`) and
    `CapsjaxFashionMnist` (`capsjax_fashion_mnist`), that turn the files into
    array_record splits `train` (60000) and `test` (10000) in file order.

Nothing here needs TensorFlow: the features are a uint8 `Tensor` stored as raw
bytes and a `ClassLabel`, both of which tfds encodes and decodes with numpy.

The builders read the IDX files from the tfds manual dir when it holds them,
otherwise they download them from the URLs tfds itself uses, checked by tfds
against `checksums.tsv` (sha256, next to this file) and then by us (md5).
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

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

# The canonical download locations, the same ones tfds's own builders use.
DOWNLOAD_URLS = {
    'mnist': 'https://storage.googleapis.com/cvdf-datasets/mnist/',
    'fashion_mnist':
        'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
}

FASHION_MNIST_CLASS_NAMES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
    'Sneaker', 'Bag', 'Ankle boot',
)


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


# ---------------------------------------------------------------------------
# tfds builders.

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Optional. Put the four original gzip IDX files (train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) in the manual dir. Without them the files are
downloaded from the canonical URLs.
"""


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code of our MNIST-like builders; subclasses set DATASET."""

  DATASET: str = ''
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original IDX files, file order, uint8 bytes.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, file_format: str = 'array_record', **kwargs):
    # array_record, not tfds's default tfrecord: it needs no TensorFlow to
    # write, and `tfds.data_source` reads it with random access.
    super().__init__(file_format=file_format, **kwargs)

  # tfds computes this from `code_path`, which imports the
  # `importlib_resources` backport that tfds does not install on Python
  # >= 3.9. Point at our checksums file directly instead.
  @tfds.core.utils.classproperty
  @classmethod
  def _checksums_path(cls) -> epath.Path:
    return epath.Path(__file__).with_name('checksums.tsv')

  def _label_feature(self) -> tfds.features.ClassLabel:
    return tfds.features.ClassLabel(num_classes=NUM_CLASSES)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.DATASET} from the original IDX files.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            'label': self._label_feature(),
        }),
        supervised_keys=('image', 'label'),
        # Keep the original order: validation is the tail of `train`.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self._source_files(dl_manager)
    verify_idx_files(self.DATASET, paths)
    return {
        split: self._generate_examples(paths[images], paths[labels])
        for split, (images, labels) in SPLIT_ROLES.items()
    }

  def _source_files(self, dl_manager) -> dict[str, Path]:
    """The IDX files from the manual dir if it has any, else downloaded."""
    manual_dir = _manual_dir_or_none(dl_manager)
    if manual_dir is not None:
      paths = idx_paths_in(manual_dir, self.DATASET)
      if any(path.exists() for path in paths.values()):
        return paths
    base_url = DOWNLOAD_URLS[self.DATASET]
    urls = {role: base_url + spec.filename
            for role, spec in KNOWN_IDX_FILES[self.DATASET].items()}
    # tfds checks size and sha256 of each download against checksums.tsv.
    downloaded = dl_manager.download(urls)
    return {role: Path(os.fspath(path)) for role, path in downloaded.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx_split(images_path, labels_path)
    images = images[..., np.newaxis]
    for index in range(len(labels)):
      yield index, {'image': images[index], 'label': int(labels[index])}


def _manual_dir_or_none(dl_manager) -> epath.Path | None:
  """The manual dir, or None if it is not set, missing or empty."""
  try:
    return dl_manager.manual_dir
  except AssertionError:  # How tfds says "missing or empty".
    return None


class CapsjaxMnist(_IdxBuilder):
  """MNIST from the original IDX files (tfds name `capsjax_mnist`)."""

  DATASET = 'mnist'


class CapsjaxFashionMnist(_IdxBuilder):
  """Fashion-MNIST from the original IDX files (`capsjax_fashion_mnist`)."""

  DATASET = 'fashion_mnist'

  def _label_feature(self) -> tfds.features.ClassLabel:
    return tfds.features.ClassLabel(names=FASHION_MNIST_CLASS_NAMES)


BUILDERS: dict[str, type[_IdxBuilder]] = {
    'mnist': CapsjaxMnist,
    'fashion_mnist': CapsjaxFashionMnist,
}


PREPARED_RECORD = 'capsjax_prepared.json'


def prepare(dataset: str, tfds_data_dir: str | os.PathLike,
            idx_dir: str | os.PathLike | None = None) -> _IdxBuilder:
  """Returns the builder of `dataset`, prepared in `tfds_data_dir`.

  On every call, before anything is read: the IDX files in `idx_dir` (None
  means download them) are verified (`verify_idx_files`), and a prepared
  dataset is checked against what was recorded when it was written
  (`PREPARED_RECORD` beside it: the source files' names, sizes and md5
  sums, and the sha256 of every prepared file). It is prepared again when it
  is missing, damaged or from other files. Preparing happens under a lock in
  `tfds_data_dir`, so runs sharing the folder never see a half-written one.
  """
  check_dataset_name(dataset)
  if idx_dir is not None:
    verify_idx_files(dataset, idx_paths_in(idx_dir, dataset))
  tfds_data_dir = Path(tfds_data_dir).expanduser()
  try:
    tfds_data_dir.mkdir(parents=True, exist_ok=True)
    lock_file = (tfds_data_dir / f'.capsjax_{dataset}.lock').open('a')
  except OSError as error:
    raise DataError(f'{tfds_data_dir}: cannot write the prepared dataset '
                    f'there ({error.strerror or error})') from error
  with lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)  # Released on close or death.
    builder, problem = _prepared_builder(dataset, tfds_data_dir)
    if problem is None:
      return builder
    if problem != 'not prepared':
      print(f'warning: prepared dataset {builder.data_dir}: {problem}; '
            'preparing it again', flush=True)
      shutil.rmtree(builder.data_dir, ignore_errors=True)
      builder = BUILDERS[dataset](data_dir=os.fspath(tfds_data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=None if idx_dir is None else os.fspath(idx_dir),
            try_download_gcs=False,
        ))
    record = {'source': _source_identity(dataset),
              'prepared': _prepared_checksums(builder)}
    (Path(builder.data_dir) / PREPARED_RECORD).write_text(
        json.dumps(record, indent=1) + '\n')
    return builder


def _source_identity(dataset: str) -> dict[str, dict[str, Any]]:
  """The files a dataset is prepared from: verified to be these originals."""
  return {role: {'file': spec.filename, 'bytes': spec.num_bytes,
                 'md5': spec.md5}
          for role, spec in KNOWN_IDX_FILES[dataset].items()}


def _prepared_checksums(builder: _IdxBuilder) -> dict[str, str]:
  directory = Path(builder.data_dir)
  return {str(path.relative_to(directory)): hashlib.sha256(
      path.read_bytes()).hexdigest()
          for path in sorted(directory.rglob('*'))
          if path.is_file() and path.name != PREPARED_RECORD}


def _prepared_builder(dataset: str, tfds_data_dir: Path
                      ) -> tuple[_IdxBuilder, str | None]:
  """(builder, None) if prepared and intact, else (builder, the problem)."""
  builder_class = BUILDERS[dataset]
  try:
    builder = builder_class(data_dir=os.fspath(tfds_data_dir))
    prepared = builder.is_prepared()
  except Exception as error:  # pylint: disable=broad-except
    # Unreadable tfds metadata: start from a clean folder.
    folder = tfds_data_dir / builder_class.name / str(builder_class.VERSION)
    shutil.rmtree(folder, ignore_errors=True)
    print(f'warning: prepared dataset {folder}: unreadable '
          f'({type(error).__name__}); preparing it again', flush=True)
    return builder_class(data_dir=os.fspath(tfds_data_dir)), 'not prepared'
  if not prepared:
    return builder, 'not prepared'
  try:
    record = json.loads((Path(builder.data_dir) / PREPARED_RECORD).read_text())
  except (OSError, ValueError):
    return builder, f'no valid {PREPARED_RECORD} (how it was made is unknown)'
  if record.get('source') != _source_identity(dataset):
    return builder, 'prepared from other source files'
  checksums = _prepared_checksums(builder)
  if record.get('prepared') != checksums:
    damaged = sorted(name for name in set(checksums) | set(record['prepared'])
                     if checksums.get(name) != record['prepared'].get(name))
    return builder, (f'{len(damaged)} file(s) changed since it was prepared, '
                     f'e.g. {damaged[0]}')
  return builder, None
