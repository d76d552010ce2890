"""Tests of train/checkpoints.py's cross-process barrier at start-up.

(Saving, restoring, checksums and setting damaged steps aside are tested
through whole runs in tests/test_train.py.)
"""

import jax
import pytest

from train import checkpoints as checkpoints_lib


@pytest.fixture
def barriers(monkeypatch):
  """The names of the barriers Checkpoints passes."""
  names = []
  monkeypatch.setattr(checkpoints_lib.parallel, 'wait_for_all_processes',
                      names.append)
  return names


@pytest.mark.parametrize('process_index', [0, 1])
@pytest.mark.parametrize('directory_exists', [False, True])
def test_every_process_passes_the_verification_barrier(
    tmp_path, monkeypatch, barriers, process_index, directory_exists):
  # Whether one process finds the checkpoints folder can differ from what
  # another finds a moment later (process 0 creates it): the barrier must
  # not depend on it, or the two wait at different barriers.
  if directory_exists:
    (tmp_path / 'checkpoints').mkdir()
  monkeypatch.setattr(jax, 'process_index', lambda: process_index)
  checkpoints_lib.Checkpoints(tmp_path, keep=2)
  assert barriers == ['checkpoints verified']


def test_a_read_only_reader_passes_no_barrier(tmp_path, barriers):
  (tmp_path / 'checkpoints').mkdir()
  checkpoints_lib.Checkpoints(tmp_path, keep=2, read_only=True)
  assert barriers == []
