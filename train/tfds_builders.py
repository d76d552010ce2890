"""Our tfds builders of MNIST and Fashion-MNIST, and preparing them once.

`CapsjaxMnist` (`capsjax_mnist`) and `CapsjaxFashionMnist`
(`capsjax_fashion_mnist`) turn the original IDX files (`train/datasets.py`)
into array_record splits `train` (60000) and `test` (10000) in file order.

Nothing here needs TensorFlow: the features are a uint8 `Tensor` stored as raw
bytes and a `ClassLabel`, both of which tfds encodes and decodes with numpy.

The builders read the IDX files from the tfds manual dir when it holds them,
otherwise they download them from the URLs tfds itself uses, checked by tfds
against `checksums.tsv` (sha256, next to this file) and then by us (md5).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from train import datasets
from train.datasets import DataError

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
    return tfds.features.ClassLabel(num_classes=datasets.NUM_CLASSES)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.DATASET} from the original IDX files.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(datasets.IMAGE_SIZE, datasets.IMAGE_SIZE, 1),
                dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            'label': self._label_feature(),
        }),
        supervised_keys=('image', 'label'),
        # Keep the original order: validation is the tail of `train`.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self._source_files(dl_manager)
    datasets.verify_idx_files(self.DATASET, paths)
    return {
        split: self._generate_examples(paths[images], paths[labels])
        for split, (images, labels) in datasets.SPLIT_ROLES.items()
    }

  def _source_files(self, dl_manager) -> dict[str, Path]:
    """The IDX files from the manual dir if it has any, else downloaded."""
    manual_dir = _manual_dir_or_none(dl_manager)
    if manual_dir is not None:
      paths = datasets.idx_paths_in(manual_dir, self.DATASET)
      if any(path.exists() for path in paths.values()):
        return paths
    base_url = DOWNLOAD_URLS[self.DATASET]
    urls = {role: base_url + spec.filename
            for role, spec in datasets.KNOWN_IDX_FILES[self.DATASET].items()}
    # tfds checks size and sha256 of each download against checksums.tsv.
    downloaded = dl_manager.download(urls)
    return {role: Path(os.fspath(path)) for role, path in downloaded.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = datasets.read_idx_split(images_path, labels_path)
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
  means download them) are verified (`datasets.verify_idx_files`), and a
  prepared dataset is checked against what was recorded when it was written
  (`PREPARED_RECORD` beside it: the source files' names, sizes and md5
  sums, and the sha256 of every prepared file). It is prepared again when it
  is missing, damaged or from other files. Preparing happens under a lock in
  `tfds_data_dir`, so runs sharing the folder never see a half-written one.
  """
  datasets.check_dataset_name(dataset)
  if idx_dir is not None:
    datasets.verify_idx_files(dataset, datasets.idx_paths_in(idx_dir, dataset))
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
          for role, spec in datasets.KNOWN_IDX_FILES[dataset].items()}


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
