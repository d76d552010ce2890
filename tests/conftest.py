"""Shared fixtures: the real data next to the repo, prepared once a session."""

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

import jax
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # Import `train` without installing it.
  sys.path.insert(0, str(REPO_ROOT))

from train import datasets  # pylint: disable=g-import-not-at-top
from train import tfds_builders  # pylint: disable=g-import-not-at-top
from train import tfds_splits  # pylint: disable=g-import-not-at-top

SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data'

_timings: dict[str, float] = {}


def _shared_idx_dir(dataset: str) -> Path:
  """The folder of `dataset`'s original IDX files; skips the test if absent."""
  directory = SHARED_DATA_DIR / dataset
  if not all((directory / spec.filename).is_file()
             for spec in datasets.KNOWN_IDX_FILES[dataset].values()):
    pytest.skip(f'real {dataset} IDX files not found in {directory}')
  return directory


@pytest.fixture(scope='session')
def shared_idx_dir():
  """shared_idx_dir(dataset) -> the shared IDX folder, or skip the test."""
  return _shared_idx_dir


@pytest.fixture(scope='session')
def mnist_idx_dir() -> Path:
  return _shared_idx_dir('mnist')


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path):
  with open(lock_path, 'w') as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _session_dir(tmp_path_factory) -> Path:
  """A folder of this test session, shared by its pytest-xdist workers."""
  if os.environ.get('PYTEST_XDIST_WORKER'):
    return tmp_path_factory.getbasetemp().parent  # The session's basetemp.
  return tmp_path_factory.getbasetemp()


@pytest.fixture(scope='session')
def mnist_tfds_dir(mnist_idx_dir, tmp_path_factory) -> Path:
  """A tfds data dir with MNIST prepared by our builder, once a session (the
  first xdist worker to get here prepares it; the others wait and reuse)."""
  session_dir = _session_dir(tmp_path_factory)
  tfds_dir = session_dir / 'capsjax_tfds'
  with _exclusive_lock(session_dir / 'capsjax_tfds.lock'):
    if not tfds_builders.CapsjaxMnist(data_dir=str(tfds_dir)).is_prepared():
      start = time.perf_counter()
      tfds_builders.prepare('mnist', tfds_dir, mnist_idx_dir)
      _timings['prepare MNIST with CapsjaxMnist'] = (
          time.perf_counter() - start)
  return tfds_dir


@pytest.fixture(scope='session')
def mnist_splits(mnist_idx_dir, mnist_tfds_dir) -> tfds_splits.Splits:
  start = time.perf_counter()
  splits = tfds_splits.load_splits('mnist', str(mnist_idx_dir),
                                      str(mnist_tfds_dir))
  _timings['load_splits(mnist), prepared'] = time.perf_counter() - start
  return splits


def pytest_sessionfinish(session):
  """On an xdist worker, sends the timings to the controller."""
  worker_output = getattr(session.config, 'workeroutput', None)
  if worker_output is not None:
    worker_output['capsjax_timings'] = dict(_timings)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """On the xdist controller, collects a worker's timings."""
  del error
  _timings.update(getattr(node, 'workeroutput', {}).get('capsjax_timings', {}))


def pytest_terminal_summary(terminalreporter):
  for what, seconds in _timings.items():
    terminalreporter.write_line(f'{what}: {seconds:.1f} s')


@pytest.fixture(scope='module')
def fast_init_prng():
  """'rbg' keys for a module (`pytestmark = pytest.mark.usefixtures(...)`):
  XLA:CPU compiles parameter initialisation with the default threefry keys
  about 20x slower (measured 26 s against 1.2 s for a tiny CapsNet's
  create_train_state). Only for modules whose tests do not depend on the
  random values."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')
  yield
  jax.config.update('jax_default_prng_impl', previous)
