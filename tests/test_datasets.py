"""Tests of IDX parsing and verification (train/datasets) and of our tfds
builders (train/tfds_builders)."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

from train import datasets
from train import tfds_builders
from train.datasets import DataError


def write_idx(path: Path, magic: int, array: np.ndarray) -> Path:
  """Writes `array` (uint8) as gzip IDX with the given magic number."""
  header = struct.pack(f'>I{array.ndim}I', magic, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())
  return path


def link_mnist_files(source_dir: Path, target_dir: Path,
                     skip: str | None = None) -> dict[str, Path]:
  """Symlinks the four MNIST files into target_dir, except role `skip`."""
  target_dir.mkdir(exist_ok=True)
  paths = datasets.idx_paths_in(target_dir, 'mnist')
  for role, path in paths.items():
    if role != skip:
      path.symlink_to(source_dir / path.name)
  return paths


@pytest.mark.parametrize('dataset', ['mnist', 'fashion_mnist'])
def test_real_files_verify(dataset, shared_idx_dir):
  directory = shared_idx_dir(dataset)
  datasets.verify_idx_files(dataset, datasets.idx_paths_in(directory, dataset))


@pytest.mark.parametrize('dataset', ['mnist', 'fashion_mnist'])
def test_checksums_tsv_matches_table_and_files(dataset, shared_idx_dir):
  """tfds loads our checksums.tsv; its sha256 sums are those of the files."""
  directory = shared_idx_dir(dataset)
  url_infos = tfds_builders.BUILDERS[dataset].url_infos
  for spec in datasets.KNOWN_IDX_FILES[dataset].values():
    url_info = url_infos[tfds_builders.DOWNLOAD_URLS[dataset] + spec.filename]
    assert int(url_info.size) == spec.num_bytes
    data = (directory / spec.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == url_info.checksum
    assert hashlib.md5(data).hexdigest() == spec.md5


def test_read_idx_real_labels(mnist_idx_dir):
  labels = datasets.read_idx(mnist_idx_dir / 't10k-labels-idx1-ubyte.gz',
                             datasets.LABELS_MAGIC)
  assert labels.shape == (10000,) and labels.dtype == np.uint8
  expected = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  assert np.bincount(labels).tolist() == expected


def test_missing_file_names_it(mnist_idx_dir, tmp_path):
  paths = link_mnist_files(mnist_idx_dir, tmp_path, skip='test_labels')
  with pytest.raises(DataError, match='missing') as error:
    datasets.verify_idx_files('mnist', paths)
  assert str(paths['test_labels']) in str(error.value)


def test_truncated_file_names_it(mnist_idx_dir, tmp_path):
  paths = link_mnist_files(mnist_idx_dir, tmp_path, skip='test_images')
  data = (mnist_idx_dir / 't10k-images-idx3-ubyte.gz').read_bytes()
  paths['test_images'].write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match='truncated') as error:
    datasets.verify_idx_files('mnist', paths)
  assert str(paths['test_images']) in str(error.value)
  assert len(str(error.value).splitlines()) == 1
  with pytest.raises(DataError, match='truncated') as error:
    datasets.read_idx(paths['test_images'])
  assert str(paths['test_images']) in str(error.value)


def test_file_cut_inside_header_names_it(tmp_path):
  path = tmp_path / 'train-labels-idx1-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(b'\x00\x00\x08')
  with pytest.raises(DataError, match='header') as error:
    datasets.read_idx_header(path)
  assert str(path) in str(error.value)


def test_checksum_mismatch_names_it(mnist_idx_dir, tmp_path):
  paths = link_mnist_files(mnist_idx_dir, tmp_path, skip='train_labels')
  data = bytearray((mnist_idx_dir / 'train-labels-idx1-ubyte.gz').read_bytes())
  data[len(data) // 2] ^= 0xFF  # Same size, header intact, content changed.
  paths['train_labels'].write_bytes(bytes(data))
  with pytest.raises(DataError, match='md5') as error:
    datasets.verify_idx_files('mnist', paths)
  assert str(paths['train_labels']) in str(error.value)


def test_bad_magic_names_it(mnist_idx_dir, tmp_path):
  paths = link_mnist_files(mnist_idx_dir, tmp_path, skip='test_labels')
  labels = datasets.read_idx(mnist_idx_dir / 't10k-labels-idx1-ubyte.gz')
  write_idx(paths['test_labels'], 0x00000901, labels)  # Not 0x801.
  with pytest.raises(DataError, match='magic') as error:
    datasets.verify_idx_files('mnist', paths)
  assert str(paths['test_labels']) in str(error.value)
  with pytest.raises(DataError, match='magic') as error:
    datasets.read_idx(paths['test_labels'], datasets.LABELS_MAGIC)
  assert str(paths['test_labels']) in str(error.value)


def test_not_gzip_names_it(tmp_path):
  path = tmp_path / 'train-images-idx3-ubyte'
  path.write_bytes(b'\x00\x00\x08\x03' + bytes(100))
  with pytest.raises(DataError) as error:
    datasets.read_idx(path)
  assert str(path) in str(error.value)


def test_label_count_mismatch_names_it(mnist_idx_dir, tmp_path):
  paths = link_mnist_files(mnist_idx_dir, tmp_path, skip='train_labels')
  labels = datasets.read_idx(mnist_idx_dir / 'train-labels-idx1-ubyte.gz')
  write_idx(paths['train_labels'], datasets.LABELS_MAGIC, labels[:-1])
  with pytest.raises(DataError, match='59999 labels') as error:
    datasets.verify_idx_files('mnist', paths)
  assert str(paths['train_labels']) in str(error.value)


def test_read_idx_split_checks_counts_and_payload(tmp_path):
  images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8)
  images_path = write_idx(tmp_path / 'images.gz', datasets.IMAGES_MAGIC,
                          images.reshape(3, 28, 28))
  labels_path = write_idx(tmp_path / 'labels.gz', datasets.LABELS_MAGIC,
                          np.array([1, 2], np.uint8))
  with pytest.raises(DataError, match='2 labels') as error:
    datasets.read_idx_split(images_path, labels_path)
  assert str(labels_path) in str(error.value)

  write_idx(labels_path, datasets.LABELS_MAGIC, np.array([1, 2, 3], np.uint8))
  read_images, read_labels = datasets.read_idx_split(images_path, labels_path)
  np.testing.assert_array_equal(read_images.reshape(-1), images)
  assert read_labels.tolist() == [1, 2, 3]

  with gzip.open(labels_path, 'wb') as f:  # Header says 3, payload has 2.
    f.write(struct.pack('>II', datasets.LABELS_MAGIC, 3) + b'\x01\x02')
  with pytest.raises(DataError, match='expected') as error:
    datasets.read_idx(labels_path)
  assert str(labels_path) in str(error.value)


def test_unknown_dataset():
  with pytest.raises(DataError, match='cifar10'):
    datasets.idx_paths_in('/nowhere', 'cifar10')


def test_builders_are_registered_without_clashing():
  assert tfds.builder_cls('capsjax_mnist') is tfds_builders.CapsjaxMnist
  assert (tfds.builder_cls('capsjax_fashion_mnist')
          is tfds_builders.CapsjaxFashionMnist)
  assert tfds.builder_cls('mnist') is not tfds_builders.CapsjaxMnist


def test_prepare_verifies_before_writing(mnist_idx_dir, tmp_path):
  idx_dir = tmp_path / 'idx'
  paths = link_mnist_files(mnist_idx_dir, idx_dir, skip='train_images')
  data = (mnist_idx_dir / 'train-images-idx3-ubyte.gz').read_bytes()
  paths['train_images'].write_bytes(data[:-1000])
  tfds_dir = tmp_path / 'tfds'
  with pytest.raises(DataError, match='truncated') as error:
    tfds_builders.prepare('mnist', tfds_dir, idx_dir)
  assert str(paths['train_images']) in str(error.value)
  assert not (tfds_dir / 'capsjax_mnist').exists()


class FakeDownloadManager:
  """Stands in for tfds's DownloadManager: no manual dir, fake downloads."""

  def __init__(self, manual_dir, files_dir):
    self._manual_dir = manual_dir
    self._files_dir = files_dir
    self.downloaded_urls = None

  @property
  def manual_dir(self):
    if self._manual_dir is None:
      raise AssertionError('Manual directory does not exist or is empty.')
    return self._manual_dir

  def download(self, urls):
    self.downloaded_urls = dict(urls)
    return {role: self._files_dir / os.path.basename(url)
            for role, url in urls.items()}


@pytest.mark.parametrize('dataset', ['mnist', 'fashion_mnist'])
def test_without_manual_files_builder_downloads_canonical_urls(
    dataset, tmp_path):
  """The download path, without network: the URLs asked for are the ones
  tfds uses (and that checksums.tsv covers); the results are used."""
  builder = tfds_builders.BUILDERS[dataset](data_dir=str(tmp_path))
  for manual_dir in (None, tmp_path):  # Not set, or without the files.
    manager = FakeDownloadManager(manual_dir, files_dir=Path('/downloads'))
    paths = builder._source_files(manager)  # pylint: disable=protected-access
    assert set(manager.downloaded_urls.values()) <= set(builder.url_infos)
    assert len(manager.downloaded_urls) == 4
    assert paths['test_labels'] == Path('/downloads/t10k-labels-idx1-ubyte.gz')


def test_with_manual_files_builder_uses_them(mnist_idx_dir, tmp_path):
  builder = tfds_builders.CapsjaxMnist(data_dir=str(tmp_path))
  manager = FakeDownloadManager(mnist_idx_dir, files_dir=Path('/downloads'))
  paths = builder._source_files(manager)  # pylint: disable=protected-access
  assert manager.downloaded_urls is None
  assert paths == datasets.idx_paths_in(mnist_idx_dir, 'mnist')


def test_prepared_dataset_info(mnist_tfds_dir):
  builder = tfds_builders.CapsjaxMnist(data_dir=str(mnist_tfds_dir))
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 60000
  assert builder.info.splits['test'].num_examples == 10000
  assert builder.info.file_format.value == 'array_record'
  files = {path.name for path in Path(builder.data_dir).iterdir()}
  assert any('array_record' in name for name in files)


@contextlib.contextmanager
def serve_directory(directory: Path):
  """Serves `directory` over HTTP on the loopback interface; yields base URL."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(directory))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/'
  finally:
    server.shutdown()
    server.server_close()


def local_url_infos(base_url: str, corrupt: bool = False):
  """checksums.tsv's MNIST entries, moved to base_url (optionally one wrong)."""
  canonical = tfds_builders.DOWNLOAD_URLS['mnist']
  infos = {base_url + url[len(canonical):]: info
           for url, info in tfds_builders.CapsjaxMnist.url_infos.items()
           if url.startswith(canonical)}
  if corrupt:
    url = min(infos)
    infos[url] = checksums.UrlInfo(size=infos[url].size, checksum='0' * 64,
                                   filename=infos[url].filename)
  return infos


@pytest.mark.parametrize('corrupt', [False, True])
def test_download_path_through_tfds(mnist_idx_dir, tmp_path, monkeypatch,
                                    corrupt):
  """The real tfds DownloadManager fetches the four files (from a loopback
  server standing in for the canonical host), checks them against our
  checksums, and our builder verifies them. Only one example per split is
  written, to keep it fast."""
  with serve_directory(mnist_idx_dir) as base_url:
    url_infos = local_url_infos(base_url, corrupt)
    monkeypatch.setitem(tfds_builders.DOWNLOAD_URLS, 'mnist', base_url)
    monkeypatch.setattr(tfds_builders.CapsjaxMnist, 'url_infos', url_infos)
    builder = tfds_builders.CapsjaxMnist(data_dir=str(tmp_path))
    download_config = tfds.download.DownloadConfig(
        max_examples_per_split=1, try_download_gcs=False)
    if corrupt:
      with pytest.raises(Exception, match='wrong checksum'):
        builder.download_and_prepare(download_config=download_config)
    else:
      builder.download_and_prepare(download_config=download_config)
      downloaded = list((tmp_path / 'downloads').rglob('*-ubyte*.gz'))
      assert len(downloaded) == 4, sorted((tmp_path / 'downloads').rglob('*'))
      assert builder.info.splits['test'].num_examples == 1


def test_damaged_prepared_dataset_is_prepared_again(mnist_idx_dir,
                                                    mnist_tfds_dir, tmp_path,
                                                    capsys):
  tfds_dir, pristine_dir = tmp_path / 'tfds', tmp_path / 'pristine'
  shutil.copytree(mnist_tfds_dir, tfds_dir)
  shutil.copytree(mnist_tfds_dir, pristine_dir)
  builder = tfds_builders.CapsjaxMnist(data_dir=str(tfds_dir))
  record = json.loads(
      (Path(builder.data_dir) / tfds_builders.PREPARED_RECORD).read_text())
  assert set(record['source']) == set(datasets.ROLES)
  test_file = next(Path(builder.data_dir).glob('*test.array_record*'))
  original = test_file.read_bytes()
  with test_file.open('r+b') as file:  # A few bytes inside the records.
    file.seek(len(original) // 2)
    file.write(b'\xff' * 64)

  builder = tfds_builders.prepare('mnist', tfds_dir, mnist_idx_dir)

  warning = capsys.readouterr().out
  assert f'warning: prepared dataset {builder.data_dir}' in warning
  assert test_file.name in warning and 'preparing it again' in warning
  # The same examples as before the damage. (Not the same bytes: a record
  # may serialize its features in another order.)
  def test_examples(data_dir):
    source = tfds_builders.CapsjaxMnist(data_dir=str(data_dir)
                                        ).as_data_source(split='test')
    examples = source.__getitems__(list(range(len(source))))
    return (np.stack([example['image'] for example in examples]),
            np.array([example['label'] for example in examples]))
  images, labels = test_examples(tfds_dir)
  expected_images, expected_labels = test_examples(pristine_dir)
  assert len(labels) == 10000
  np.testing.assert_array_equal(images, expected_images)
  np.testing.assert_array_equal(labels, expected_labels)
  # Intact now: the next call neither warns nor prepares.
  tfds_builders.prepare('mnist', tfds_dir, mnist_idx_dir)
  assert 'warning' not in capsys.readouterr().out


def test_concurrent_prepare_writes_one_dataset(mnist_idx_dir, tmp_path):
  script = ('import sys; from train import tfds_builders; '
            'tfds_builders.prepare("mnist", sys.argv[1], sys.argv[2])')
  tfds_dir = tmp_path / 'tfds'
  processes = [subprocess.Popen(
      [sys.executable, '-c', script, str(tfds_dir), str(mnist_idx_dir)],
      cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT) for _ in range(2)]
  outputs = [process.communicate(timeout=600)[0] for process in processes]
  assert [process.returncode for process in processes] == [0, 0], outputs
  builder = tfds_builders.CapsjaxMnist(data_dir=str(tfds_dir))
  assert builder.is_prepared()
  # One complete dataset, matching the checksums recorded with it.
  assert tfds_builders._prepared_builder('mnist', tfds_dir)[1] is None  # pylint: disable=protected-access
  assert not list((tfds_dir / 'capsjax_mnist').glob('*incomplete*'))
