"""Tests of the training program (train/train.py, train/main.py).

Every run trains a small CapsNet (16 conv features, 4 primary capsule types)
for 12 steps of 8 examples on the first 64 real MNIST training images, and
evaluates on 100 validation and 100 test images: compiling dominates. One run
is in this process (`train.train_and_evaluate`); the others are subprocesses,
the only way to get a fresh JAX (a forced number of CPU devices,
`jax.distributed`) or to SIGKILL a run.

To keep the file at a few CPU-minutes: the worker subprocesses start at the
first test and compile while it runs; the subprocesses share a persistent
compilation cache (runs on the same devices compile once); and they compile
with `--xla_backend_optimization_level=0` (about 4x faster to compile on
CPU). Runs compared with each other all use the same flags.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import batching
from train import models
from train import parallel as parallel_lib
from train import reporting
from train import train

import multidevice_worker  # pylint: disable=g-bad-import-order

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name('multidevice_worker.py')
TIMEOUT = 900  # Seconds; a hang fails instead of blocking the suite.

STEPS = 12
# 64 examples / batch 8 = 8 steps an epoch: an epoch ends (validation) at
# step 8, the run at step 12 (validation again). Checkpoints every 2 steps;
# the last 2 are kept, plus the best on validation.
SMALL = {
    'max_steps': STEPS,
    'batch_size': 8,
    'eval_batch_size': 40,  # 100 examples: the last batch is padded.
    'num_train_examples': 64,
    'num_eval_examples': 100,
    'model.conv_features': 16,
    'model.primary_capsule_types': 4,
    'model.decoder_hidden_sizes': (32, 64),
    'checkpoint_every_steps': 2,
    'keep_checkpoints': 2,
    'log_every_steps': 2,
    'num_reconstructions': 0,
}
LOSS_FIELDS = ('loss', 'margin_loss', 'reconstruction_loss', 'accuracy')


# ---------------------------------------------------------------------------
# Helpers.


def config_flags(overrides: dict[str, Any]) -> list[str]:
  """{'model.conv_features': 16} -> ['--config.model.conv_features=16']."""
  def text(value):
    if isinstance(value, tuple):
      return '(' + ','.join(map(str, value)) + ')'
    return str(value)
  return [f'--config.{name}={text(value)}' for name, value in overrides.items()]


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def checkpoint_steps(workdir: Path) -> set[int]:
  """The finished checkpoints (orbax renames a step's folder when done)."""
  directory = workdir / 'checkpoints'
  if not directory.is_dir():
    return set()
  return {int(path.name) for path in directory.iterdir()
          if path.name.isdigit()}


def read_checkpoint(workdir: Path, step: int) -> dict[str, np.ndarray]:
  """The train state saved at `step`, as {'params/conv1/kernel': array}."""
  path = (workdir / 'checkpoints' / str(step) / 'state').absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restored = checkpointer.restore(path, restore_args=jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return {jax.tree_util.keystr(key, simple=True, separator='/'): value
          for key, value in jax.tree_util.tree_leaves_with_path(restored)}


def read_records(workdir: Path, kind: str) -> list[dict[str, Any]]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [record for record in map(json.loads, lines)
          if record['kind'] == kind]


def assert_trees_equal(actual: dict[str, np.ndarray],
                       expected: dict[str, np.ndarray], **tolerance) -> None:
  """Same keys, and equal arrays (bitwise unless a tolerance is given)."""
  assert sorted(actual) == sorted(expected)
  for name in expected:
    if tolerance:
      np.testing.assert_allclose(actual[name], expected[name], err_msg=name,
                                 **tolerance)
    else:
      np.testing.assert_array_equal(actual[name], expected[name],
                                    err_msg=name)


class Run:
  """A subprocess of the program, its output kept in files."""

  started: list[Run] = []  # Every run of this module, for the timings.

  def __init__(self, name: str, args: list[str], env: dict[str, str],
               log_dir: Path, workdir: Path):
    self.name = name
    self.workdir = workdir
    self.stdout_path = log_dir / f'{name}.stdout'
    self.stderr_path = log_dir / f'{name}.stderr'
    self.start = time.monotonic()
    self.seconds = self.cpu_seconds = None
    Run.started.append(self)
    with self.stdout_path.open('w') as stdout, \
        self.stderr_path.open('w') as stderr:
      self.process = subprocess.Popen(
          args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
          stdout=stdout, stderr=stderr)

  @property
  def stdout(self) -> str:
    return self.stdout_path.read_text()

  @property
  def stderr(self) -> str:
    return self.stderr_path.read_text()

  def poll(self, options: int = os.WNOHANG) -> int | None:
    """The exit code, or None while running. Reaps with wait4 to get the
    process's CPU time (the wall time means little on a shared machine)."""
    if self.process.returncode is None:
      pid, status, usage = os.wait4(self.process.pid, options)
      if pid:
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.seconds = time.monotonic() - self.start
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
    return self.process.returncode

  def wait(self) -> Run:
    while self.poll() is None:
      if time.monotonic() > self.start + TIMEOUT:
        self.kill()
        pytest.fail(f'{self.name} still running after {TIMEOUT} s; stderr:\n'
                    + self.stderr[-3000:])
      time.sleep(0.05)
    return self

  def kill(self) -> None:
    if self.poll() is None:
      self.process.kill()
      self.poll(options=0)  # Blocks until it is gone.

  def succeeded(self) -> Run:
    self.wait()
    assert self.process.returncode == 0, (
        f'{self.name} exited with {self.process.returncode}; stderr:\n'
        + self.stderr[-3000:])
    return self


class WorkerRun(Run):
  """A run of tests/multidevice_worker.py: its final parameters in a .npz."""

  def __init__(self, name, overrides, env, log_dir, workdir, *worker_flags):
    self.npz_path = log_dir / f'{name}.npz'
    super().__init__(
        name, [sys.executable, str(WORKER), f'--workdir={workdir}',
               f'--out={self.npz_path}',
               f'--overrides={json.dumps(overrides)}', *worker_flags],
        env, log_dir, workdir)

  def result(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(params as {'conv1/kernel': array}, meta), once finished."""
    self.succeeded()
    with np.load(self.npz_path) as npz:
      arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays.pop('__meta__')))
    return arrays, meta


class Runs:
  """Starts the subprocesses of this module; each named run starts once."""

  def __init__(self, directory: Path, idx_dir: Path, tfds_dir: Path):
    self.directory = directory
    self.cache_dir = directory / 'jax_cache'
    self.data = {'data_dir': str(idx_dir), 'tfds_data_dir': str(tfds_dir)}
    self._runs: dict[str, Run] = {}

  def env(self, num_devices: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=(f'--xla_force_host_platform_device_count={num_devices} '
                   '--xla_backend_optimization_level=0'),
        JAX_PLATFORMS='cpu',
        JAX_COMPILATION_CACHE_DIR=str(self.cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
        **extra)
    return env

  def workdir(self, name: str) -> Path:
    return self.directory / name

  def main(self, name: str, overrides: dict[str, Any], workdir: Path,
           num_devices: int = 1, args: tuple[str, ...] = (),
           **env: str) -> Run:
    """`python -m train.main` with SMALL, the data dirs and `overrides`;
    `args` come before the --config.FIELD flags (a --config=FILE must) and
    may repeat --workdir to override it."""
    flags = config_flags({**SMALL, **self.data, **overrides})
    return Run(name, [sys.executable, '-m', 'train.main',
                      f'--workdir={workdir}', *args, *flags],
               self.env(num_devices, **env), self.directory, workdir)

  def worker(self, name: str, num_devices: int = 1,
             overrides: dict[str, Any] | None = None,
             workdir: Path | None = None, *worker_flags: str) -> WorkerRun:
    """A named WorkerRun of SMALL (+ overrides), started on first call."""
    if name not in self._runs:
      workdir = workdir or self.workdir(name)
      self._runs[name] = WorkerRun(
          name, {**SMALL, **self.data, **(overrides or {})},
          self.env(num_devices), self.directory, workdir, *worker_flags)
    return self._runs[name]

  def reference(self) -> WorkerRun:
    """SMALL on one device, uninterrupted: what the other runs must give."""
    return self.worker('one_device', 1)

  def devices(self, num_devices: int) -> WorkerRun:
    """SMALL on `num_devices` devices of one process."""
    return self.worker(f'{num_devices}_devices', num_devices)

  def two_processes(self) -> list[WorkerRun]:
    """SMALL on two processes (jax.distributed), one device each.

    Process 0 is 35 s late with the data, which the others wait for: more
    than a CPU (gloo) collective waits.
    """
    if 'process_0' not in self._runs:
      distributed = {'distributed': 'True',
                     'coordinator_address': f'localhost:{free_port()}',
                     'num_processes': 2}
      for index in range(2):
        self.worker(f'process_{index}', 1,
                    {**distributed, 'process_id': index},
                    self.workdir('two_processes'),
                    '--delay_data_on_process_0=35')
    return [self._runs['process_0'], self._runs['process_1']]

  def start_in_background(self) -> None:
    """Starts the worker runs, so that they compile while the in-process
    test does; the tests that need them wait for them."""
    self.reference()
    self.devices(2)
    self.devices(4)
    self.two_processes()


@pytest.fixture(scope='module')
def runs(tmp_path_factory, mnist_idx_dir, mnist_tfds_dir):
  all_runs = Runs(tmp_path_factory.mktemp('train_runs'), mnist_idx_dir,
                  mnist_tfds_dir)
  yield all_runs
  for run in Run.started:  # Any still running after a failure.
    run.kill()
  # Wall and CPU seconds of each subprocess, to keep an eye on the cost.
  (all_runs.directory / 'timings.txt').write_text(''.join(
      f'{run.name}: {run.seconds:.1f} s wall, {run.cpu_seconds:.1f} s CPU\n'
      for run in Run.started if run.seconds is not None))


# ---------------------------------------------------------------------------
# 1. A real run, in this process.


def test_train_and_evaluate_end_to_end(runs, tmp_path):
  # The subprocess runs of the later tests compile meanwhile.
  runs.start_in_background()
  config = multidevice_worker.make_config(
      {**SMALL, **runs.data, 'num_reconstructions': 4})

  results = train.train_and_evaluate(config, str(tmp_path))

  epochs = read_records(tmp_path, 'epoch')
  assert [record['step'] for record in epochs] == [8, STEPS]
  assert [record['epoch'] for record in epochs] == [1.0, 1.5]
  for record in epochs:
    for split in ('train', 'validation'):
      values = {name: record[f'{split}_{name}'] for name in LOSS_FIELDS}
      assert all(math.isfinite(value) for value in values.values()), record
      assert values['margin_loss'] > 0 and values['reconstruction_loss'] > 0
      assert values['loss'] == pytest.approx(
          values['margin_loss'] + values['reconstruction_loss'], rel=1e-5)
      assert 0 <= values['accuracy'] <= 1
    # This process's high-water mark: at least the libraries and the data.
    assert 200 < record['peak_resident_mb'] < 64 * 1024
  assert epochs[0]['peak_resident_mb'] <= epochs[1]['peak_resident_mb']
  # The best checkpoint on validation is the one tested.
  best = max(epochs, key=lambda record: record['validation_accuracy'])
  assert results['checkpoint_step'] == best['step']
  assert results['validation_accuracy'] == best['validation_accuracy']
  assert results['test_examples'] == 100
  assert math.isfinite(results['test_loss'])
  assert results['test_error'] == pytest.approx(1 - results['test_accuracy'])

  (test_record,) = read_records(tmp_path, 'test')
  assert test_record['step'] == STEPS
  assert test_record['test_accuracy'] == results['test_accuracy']
  assert json.loads((tmp_path / 'test_results.json').read_text()) == results
  assert (tmp_path / 'reconstructions.png').read_bytes()[:8] == (
      b'\x89PNG\r\n\x1a\n')
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  # The last 2 checkpoints, and the best on validation.
  assert checkpoint_steps(tmp_path) == {10, 12, results['checkpoint_step']}


# ---------------------------------------------------------------------------
# 2. Kill and resume; an unreadable checkpoint.


def test_killed_run_resumes_to_the_same_state(runs):
  reference_params, _ = runs.reference().result()
  reference_dir = runs.reference().workdir
  reference_state = read_checkpoint(reference_dir, STEPS)
  # What the worker held in memory is what the checkpoint has.
  assert_trees_equal(
      {name.removeprefix('params/'): value
       for name, value in reference_state.items()
       if name.startswith('params/')}, reference_params)

  workdir = runs.workdir('killed')
  killed = runs.main('killed', {}, workdir)
  while killed.poll() is None and not checkpoint_steps(workdir):
    time.sleep(0.02)
  assert killed.poll() is None, (
      'the run ended before a checkpoint was written:\n' + killed.stderr[-3000:])
  killed.process.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.process.returncode == -signal.SIGKILL
  saved_before_kill = checkpoint_steps(workdir)
  assert saved_before_kill and STEPS not in saved_before_kill
  assert not (workdir / 'test_results.json').exists()

  resumed = runs.main('resumed', {}, workdir).succeeded()

  match = re.search(r'resumed from the checkpoint at step (\d+)',
                    resumed.stdout)
  assert match, resumed.stdout
  assert max(saved_before_kill) <= int(match[1]) < STEPS
  assert_trees_equal(read_checkpoint(workdir, STEPS), reference_state)
  # The best-on-validation bookkeeping was resumed too.
  assert (json.loads((workdir / 'test_results.json').read_text())
          == json.loads((reference_dir / 'test_results.json').read_text()))
  # Every epoch record, the training metrics too: the running sums of the
  # epoch the kill interrupted were in its checkpoint.
  epochs = read_records(workdir, 'epoch')
  expected_epochs = read_records(reference_dir, 'epoch')
  assert [record['step'] for record in epochs] == [8, STEPS]
  for record, expected in zip(epochs, expected_epochs, strict=True):
    for name in LOSS_FIELDS:
      assert record[f'train_{name}'] == expected[f'train_{name}'], name
      assert record[f'validation_{name}'] == expected[f'validation_{name}']
    assert record['train_gradient_norm'] == expected['train_gradient_norm']
  # Library INFO and WARNING lines stay out of a normal run's output.
  assert not re.findall(r'^[IW]\d{4} ', resumed.stderr + resumed.stdout,
                        re.MULTILINE), resumed.stderr[-2000:]


def test_unreadable_checkpoint_is_set_aside(runs):
  reference_dir = runs.reference().succeeded().workdir
  workdir = runs.workdir('unreadable')
  shutil.copytree(reference_dir, workdir)
  newest = workdir / 'checkpoints' / str(STEPS)
  files = sorted(str(path.relative_to(newest))
                 for path in newest.rglob('*') if path.is_file())
  data_file = max((path for path in (newest / 'state').rglob('*')
                   if path.is_file()), key=lambda path: path.stat().st_size)
  size = data_file.stat().st_size
  os.truncate(data_file, size // 2)

  run = runs.main('unreadable', {}, workdir).succeeded()

  (warning,) = [line for line in run.stdout.splitlines()
                if line.startswith('warning:')]
  assert f'checkpoint {newest} is unreadable' in warning
  assert warning.endswith('using the previous one')
  assert f'resumed from the checkpoint at step {STEPS - 2}' in run.stdout
  # Moved aside whole, not deleted.
  (moved,) = [path for path in (workdir / 'unreadable_checkpoints').iterdir()
              if path.is_dir()]
  assert moved.name.startswith(f'{STEPS}-')
  assert sorted(str(path.relative_to(moved)) for path in moved.rglob('*')
                if path.is_file()) == files
  assert (moved / data_file.relative_to(newest)).stat().st_size == size // 2
  # Steps 11 and 12 again, to the same state.
  assert_trees_equal(read_checkpoint(workdir, STEPS),
                     read_checkpoint(reference_dir, STEPS))
  # The best checkpoint, saved before the restart, was kept and tested.
  assert checkpoint_steps(workdir) == checkpoint_steps(reference_dir)
  assert (json.loads((workdir / 'test_results.json').read_text())
          == json.loads((reference_dir / 'test_results.json').read_text()))


# ---------------------------------------------------------------------------
# 3. Several devices; 4. several processes.


@pytest.mark.parametrize('num_devices', [2, 4])
def test_devices_give_the_same_training(runs, num_devices):
  expected_params, expected_meta = runs.reference().result()
  run = runs.devices(num_devices)
  params, meta = run.result()

  assert expected_meta['device_count'] == 1
  assert meta['device_count'] == num_devices
  assert meta['step'] == expected_meta['step'] == STEPS
  assert_trees_equal(params, expected_params, rtol=1e-4, atol=1e-6)
  expected_epochs = read_records(runs.reference().workdir, 'epoch')
  for record, expected in zip(read_records(run.workdir, 'epoch'),
                              expected_epochs, strict=True):
    for name in ('train_loss', 'validation_loss'):
      assert record[name] == pytest.approx(expected[name], rel=1e-5)
  assert meta['results']['test_loss'] == pytest.approx(
      expected_meta['results']['test_loss'], rel=1e-5)


def test_two_processes_hold_the_same_parameters(runs):
  # Process 0 is 35 s late with the data: the others wait at a barrier that
  # must outlast the 30 s a CPU (gloo) collective waits.
  hosts = runs.two_processes()
  # If one fails, the other would wait for it until TIMEOUT: stop it.
  deadline = time.monotonic() + TIMEOUT
  while (any(host.poll() is None for host in hosts)
         and not any(host.poll() for host in hosts)
         and time.monotonic() < deadline):
    time.sleep(0.2)
  for host in hosts:
    host.kill()
  if any(host.process.returncode != 0 for host in hosts):
    pytest.fail('\n'.join(
        f'{host.name} exited with {host.process.returncode}; stderr:\n'
        + host.stderr[-3000:] for host in hosts))
  results = [host.result() for host in hosts]
  workdir = hosts[0].workdir

  (params_0, meta_0), (params_1, meta_1) = results
  for index, meta in enumerate((meta_0, meta_1)):
    assert meta['process_index'] == index
    assert meta['process_count'] == 2
    assert meta['device_count'] == 2 and meta['local_device_count'] == 1
    assert meta['step'] == STEPS
  assert_trees_equal(params_1, params_0)
  expected_params, expected_meta = runs.reference().result()
  assert_trees_equal(params_0, expected_params, rtol=1e-4, atol=1e-6)
  assert meta_0['results']['test_loss'] == pytest.approx(
      expected_meta['results']['test_loss'], rel=1e-5)
  # Only process 0 writes the records.
  assert [record['step'] for record in read_records(workdir, 'epoch')] == [
      8, STEPS]
  assert len(read_records(workdir, 'test')) == 1


# ---------------------------------------------------------------------------
# 5. Mistakes: one line, before anything is compiled.


def make_truncated_idx_dir(mnist_idx_dir: Path, directory: Path) -> None:
  """The four MNIST files in `directory`, train-labels cut in half."""
  directory.mkdir()
  for path in mnist_idx_dir.glob('*-ubyte.gz'):
    (directory / path.name).symlink_to(path)
  labels = directory / 'train-labels-idx1-ubyte.gz'
  data = labels.read_bytes()
  labels.unlink()
  labels.write_bytes(data[:len(data) // 2])


ERRORS = {
    # name: (overrides, devices, what the error line must contain)
    'routing_iterations': ({'model.routing_iterations': 0}, 1,
                           ['config.model.routing_iterations=0', '>= 1']),
    'batch_over_devices': ({'batch_size': 3}, 2,
                           ['config.batch_size=3', 'the 2 devices']),
    'unknown_dataset': ({'dataset': 'cifar10'}, 1,
                        ["config.dataset='cifar10'", 'mnist']),
    'missing_data_dir': ({'data_dir': '{tmp}/no_such_dir'}, 1,
                         ['config.data_dir=', 'no_such_dir']),
    'unknown_flag': ({'batch_sze': 3}, 1,
                     ['--config.batch_sze', 'batch_size']),
    'truncated_idx': ({'data_dir': '{tmp}/idx',
                       'tfds_data_dir': '{tmp}/tfds'}, 1,
                      ["config.data_dir='{tmp}/idx'",
                       '{tmp}/idx/train-labels-idx1-ubyte.gz: 14440 bytes']),
    # The dataset is already prepared (in the shared tfds dir): the given
    # files are checked all the same.
    'truncated_idx_prepared': ({'data_dir': '{tmp}/idx'}, 1,
                               ["config.data_dir='{tmp}/idx'",
                                '{tmp}/idx/train-labels-idx1-ubyte.gz: '
                                '14440 bytes']),
    'infinite_learning_rate': ({'learning_rate': 'inf'}, 1,
                               ['config.learning_rate=inf', 'finite']),
    'validation_size': ({'validation_size': 60000}, 1,
                        ['config.validation_size=60000', '[0, 60000)']),
    'target_without_validation': ({'validation_size': 0,
                                   'stop_at_validation_accuracy': 0.5}, 1,
                                  ['config.stop_at_validation_accuracy=0.5',
                                   'needs a validation split']),
}


@pytest.fixture(scope='module')
def error_runs(runs, mnist_idx_dir, tmp_path_factory
               ) -> dict[str, tuple[Run, Path]]:
  """{name: (its run, its tmp dir)} for every case of ERRORS, all started
  at once."""
  started = {}
  for name, (overrides, num_devices, _) in ERRORS.items():
    tmp = tmp_path_factory.mktemp(name)
    if name.startswith('truncated_idx'):
      make_truncated_idx_dir(mnist_idx_dir, tmp / 'idx')
    overrides = {key: str(value).format(tmp=tmp)
                 for key, value in overrides.items()}
    run = runs.main(f'error_{name}', overrides, tmp / 'workdir', num_devices,
                    JAX_LOG_COMPILES='1')
    started[name] = run, tmp
  return started


@pytest.mark.parametrize('name', list(ERRORS))
def test_mistake_is_a_one_line_error(error_runs, name):
  run, tmp = error_runs[name]
  run.wait()
  expected = [text.format(tmp=tmp) for text in ERRORS[name][2]]

  assert run.process.returncode == 2, run.stderr[-3000:]
  error_lines = [line for line in run.stderr.splitlines()
                 if line.startswith('error:')]
  assert len(error_lines) == 1, run.stderr[-3000:]
  assert run.stderr.rstrip().endswith(error_lines[0])
  for text in expected:
    assert text in error_lines[0]
  assert 'Traceback' not in run.stderr
  # Nothing was compiled (JAX_LOG_COMPILES logs every compilation) or saved.
  assert 'Compiling' not in run.stderr
  assert not checkpoint_steps(run.workdir)
  # Imports only: a few seconds (a compilation alone takes more). CPU time,
  # since other work on the machine can stretch the wall time any amount.
  assert run.cpu_seconds < 15, (run.cpu_seconds, run.seconds)
  if name == 'truncated_idx':  # Checked before tfds writes anything.
    assert not list((tmp / 'tfds').rglob('dataset_info.json'))


def strict_json_files(workdir: Path) -> list[Path]:
  """Every JSON file the run wrote, each checked to be strict JSON (no NaN
  or Infinity)."""
  def refuse(constant):
    raise AssertionError(f'{constant} is not JSON')
  paths = [path for path in workdir.rglob('*')
           if path.is_file() and (path.suffix in ('.json', '.jsonl') or
                                  path.name in ('metrics', 'metadata'))]
  for path in paths:
    for line in ([path.read_text()] if path.suffix != '.jsonl' else
                 path.read_text().splitlines()):
      json.loads(line, parse_constant=refuse)
  return paths


def one_error_line(run: Run, status: int) -> str:
  run.wait()
  assert run.process.returncode == status, run.stderr[-3000:]
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and run.stderr.rstrip().endswith(lines[0]), (
      run.stderr[-3000:])
  assert 'Traceback' not in run.stderr
  return lines[0]


# ---------------------------------------------------------------------------
# 6. What goes wrong in long runs.


def test_tied_validation_accuracy_tests_a_kept_checkpoint(runs):
  # A learning rate this small leaves the parameters unchanged in float32:
  # every evaluation ties, and the later checkpoint is the one kept.
  workdir = runs.workdir('tie')
  run = runs.main('tie', {'learning_rate': 1e-30}, workdir).succeeded()

  epochs = read_records(workdir, 'epoch')
  assert len({record['validation_accuracy'] for record in epochs}) == 1
  results = json.loads((workdir / 'test_results.json').read_text())
  assert results['checkpoint_step'] == STEPS
  assert results['checkpoint_step'] in checkpoint_steps(workdir)
  assert 'test of the best checkpoint' in run.stdout


def test_without_validation_split_the_last_checkpoint_is_tested(runs):
  workdir = runs.workdir('no_validation')
  run = runs.main('no_validation', {'validation_size': 0}, workdir).succeeded()

  epochs = read_records(workdir, 'epoch')
  assert [record['step'] for record in epochs] == [8, STEPS]
  assert not [field for record in epochs for field in record
              if field.startswith('validation_')]
  results = json.loads((workdir / 'test_results.json').read_text())
  assert results['checkpoint_step'] == STEPS
  assert results['validation_accuracy'] is None
  assert results['test_examples'] == 100
  # The newest checkpoints only: none has a validation accuracy to keep.
  assert checkpoint_steps(workdir) == {STEPS - 2, STEPS}
  assert 'test of the last checkpoint (no validation split)' in run.stdout
  assert 'validation' not in [line for line in run.stdout.splitlines()
                              if line.startswith('epoch ')][-1]


def test_training_stops_at_the_validation_target_and_stays_stopped(runs):
  workdir = runs.workdir('target')
  target = {'stop_at_validation_accuracy': 0.01}
  run = runs.main('target', target, workdir).succeeded()
  # The first epoch (8 steps) reaches 1% on validation: no step after it.
  assert [record['step'] for record in read_records(workdir, 'epoch')] == [8]
  results = json.loads((workdir / 'test_results.json').read_text())
  assert results['checkpoint_step'] == 8
  assert max(checkpoint_steps(workdir)) == 8
  assert 'training stops at step 8' in run.stdout

  # Run again (a queue restarted after a kill): nothing more is trained.
  again = runs.main('target_again', target, workdir).succeeded()
  assert 'reached 1.00% at step 8' in again.stdout
  assert max(checkpoint_steps(workdir)) == 8
  assert json.loads((workdir / 'test_results.json').read_text()) == results


def test_non_finite_loss_stops_before_saving(runs):
  workdir = runs.workdir('diverged')
  runs.main('diverged_start', {'max_steps': 4}, workdir).succeeded()
  assert checkpoint_steps(workdir) == {2, 4}

  run = runs.main('diverged', {'learning_rate': 1e30}, workdir,
                  args=('--allow_config_change',))

  line = one_error_line(run, 1)
  match = re.fullmatch(
      r'error: training diverged at step (\d+): (loss|gradient_norm) is '
      r'(nan|inf|-inf); stopped without saving it; the last good checkpoint '
      r'is step (\d+) in (.*)', line)
  assert match, line
  assert 4 < int(match[1]) <= 4 + SMALL['log_every_steps']
  assert int(match[4]) == max(checkpoint_steps(workdir))
  assert match[5] == str(workdir / 'checkpoints')
  # Nothing non-finite was saved or tested, and every JSON file is strict.
  assert max(checkpoint_steps(workdir)) < int(match[1])
  # The only test results are those of the run that ended at step 4.
  assert json.loads((workdir / 'test_results.json').read_text())[
      'checkpoint_step'] <= 4
  strict_json_files(workdir)
  for step in checkpoint_steps(workdir):
    for name, value in read_checkpoint(workdir, step).items():
      assert np.all(np.isfinite(value)), (step, name)


def test_changed_config_is_refused_before_anything_is_written(runs):
  reference_dir = runs.reference().succeeded().workdir
  workdir = runs.workdir('changed_config')
  shutil.copytree(reference_dir, workdir)
  saved_config = (workdir / 'config.json').read_bytes()
  steps = checkpoint_steps(workdir)

  run = runs.main('changed_config',
                  {'model.conv_features': 8, 'routing_iterations': 2},
                  workdir)

  line = one_error_line(run, 2)
  assert f'--workdir={workdir}' in line
  assert 'model.conv_features 16 -> 8' in line
  assert 'model.routing_iterations 3 -> 2' in line
  assert '--allow_config_change' in line
  assert (workdir / 'config.json').read_bytes() == saved_config
  assert checkpoint_steps(workdir) == steps
  assert not (workdir / 'unreadable_checkpoints').exists()


def test_allowed_change_of_the_train_state_is_refused_not_set_aside(runs):
  """--allow_config_change with a config whose train state differs (here
  the optimizer keeps a parameter average): the checkpoints cannot restore
  into it, and are kept, not set aside as unreadable."""
  reference_dir = runs.reference().succeeded().workdir
  workdir = runs.workdir('changed_layout')
  shutil.copytree(reference_dir, workdir)
  saved_config = (workdir / 'config.json').read_bytes()
  steps = checkpoint_steps(workdir)

  run = runs.main('changed_layout', {'parameter_average_decay': 0.5},
                  workdir, args=('--allow_config_change',))

  line = one_error_line(run, 2)
  assert f'--workdir={workdir} holds checkpoints of another' in line
  assert re.search(r'\(opt_state/\S+: not in the checkpoint;', line), line
  assert 'use a new --workdir' in line
  assert (workdir / 'config.json').read_bytes() == saved_config
  assert checkpoint_steps(workdir) == steps
  assert not (workdir / 'unreadable_checkpoints').exists()


@pytest.mark.parametrize('damage', ['metrics_json', 'array_bytes'])
def test_damaged_best_checkpoint_is_set_aside(runs, damage):
  reference_dir = runs.reference().succeeded().workdir
  reference = json.loads((reference_dir / 'test_results.json').read_text())
  best = reference['checkpoint_step']
  assert best != STEPS, 'the reference run must have an older best'
  workdir = runs.workdir(f'damaged_best_{damage}')
  shutil.copytree(reference_dir, workdir)
  folder = workdir / 'checkpoints' / str(best)
  if damage == 'metrics_json':
    (folder / 'metrics' / 'metrics').write_text('{"validation_acc')
  else:  # A few KB overwritten inside the array data: loads silently.
    data_file = max((path for path in (folder / 'state').rglob('*')
                     if path.is_file()), key=lambda path: path.stat().st_size)
    with data_file.open('r+b') as file:
      file.seek(data_file.stat().st_size // 2)
      file.write(bytes(4096))

  run = runs.main(f'damaged_best_{damage}', {}, workdir).succeeded()

  (warning,) = [line for line in run.stdout.splitlines()
                if line.startswith('warning:')]
  assert f'checkpoint {folder} is unreadable' in warning
  assert not folder.exists()
  (moved,) = [path for path in (workdir / 'unreadable_checkpoints').iterdir()
              if path.is_dir()]
  assert moved.name.startswith(f'{best}-')
  # The best of the remaining checkpoints was tested.
  results = json.loads((workdir / 'test_results.json').read_text())
  assert results['checkpoint_step'] == STEPS


def test_second_run_on_a_workdir_is_refused(runs):
  workdir = runs.workdir('locked')
  first = runs.main('locked_first', {}, workdir)
  lock = workdir / '.lock'
  deadline = time.monotonic() + TIMEOUT
  while not (lock.exists() and lock.read_text().strip()):
    assert first.poll() is None and time.monotonic() < deadline, (
        first.stderr[-3000:])
    time.sleep(0.02)

  second = runs.main('locked_second', {}, workdir)

  line = one_error_line(second, 2)
  assert line == (f'error: --workdir={workdir}: in use by another run (pid '
                  f'{first.process.pid}); wait for it to end or choose '
                  'another --workdir')
  first.succeeded()
  assert [record['step'] for record in read_records(workdir, 'epoch')] == [
      8, STEPS]


def test_bad_workdir_and_config_file_are_one_line_errors(runs, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  bad_config = tmp_path / 'bad_config.py'
  bad_config.write_text('def get_config(:\n')
  cases = {
      'workdir_is_a_file': ((f'--workdir={a_file}',),
                            f'--workdir={a_file}: exists and is not a folder'),
      'missing_config': ((f'--config={tmp_path}/none.py',),
                         f'--config={tmp_path}/none.py: no such file'),
      'config_syntax': ((f'--config={bad_config}',),
                        f'--config={bad_config}: line 1: syntax error'),
  }
  started = {name: runs.main(name, {}, tmp_path / name, args=args)
             for name, (args, _) in cases.items()}
  for name, (_, expected) in cases.items():
    assert expected in one_error_line(started[name], 2), name


def test_kill_during_final_evaluation_or_save_loses_nothing(runs):
  """SIGKILL just after the last epoch record (the final checkpoint and
  test are under way) and at the first moment a checkpoint is being
  written: each rerun ends as the uninterrupted run."""
  reference_dir = runs.reference().succeeded().workdir
  expected_results = json.loads(
      (reference_dir / 'test_results.json').read_text())
  killers = {
      'final_evaluation': lambda run: (run.workdir / 'metrics.jsonl').exists()
      and any(record['step'] == STEPS
              for record in read_records(run.workdir, 'epoch')),
      'checkpoint_save': lambda run: any(
          'tmp' in path.name
          for path in (run.workdir / 'checkpoints').glob('*'))
      if (run.workdir / 'checkpoints').is_dir() else False,
  }
  for name, moment in killers.items():
    workdir = runs.workdir(f'killed_{name}')
    run = runs.main(f'killed_{name}', {}, workdir)
    while run.poll() is None and not moment(run):
      time.sleep(0.002)
    assert run.poll() is None, f'{name}: the run ended before the moment'
    run.kill()
    runs.main(f'rerun_{name}', {}, workdir).succeeded()
    # The same checkpoint tested; the loss to float rounding (the rerun may
    # compile the evaluation alone).
    assert json.loads((workdir / 'test_results.json').read_text()) == (
        pytest.approx(expected_results, rel=1e-6)), name
    assert_trees_equal(read_checkpoint(workdir, STEPS),
                       read_checkpoint(reference_dir, STEPS))


class _PendingStep:
  """Stands in for a step's output arrays: records when it is waited on."""

  def __init__(self, events: list[str]):
    self.events = events

  def block_until_ready(self):
    self.events.append('waited for the step')
    return self


def test_progress_counts_completed_steps_not_queued_ones(capsys, monkeypatch):
  """Dispatch is asynchronous: the bar waits for the step it reports."""
  events: list[str] = []
  progress = reporting.Progress(first_step=0, total_steps=10)
  monkeypatch.setattr(
      'builtins.print',
      lambda *args, **kwargs: events.append('printed'))
  progress.update(3, step_outputs=_PendingStep(events), force=True)
  assert events == ['waited for the step', 'printed']
  # Between prints it neither waits nor prints.
  progress.update(4, step_outputs=_PendingStep(events))
  assert events == ['waited for the step', 'printed']


def test_steps_in_flight_are_bounded():
  """train.train.StepsInFlight makes room for a step before its dispatch:
  with limit L, at most L steps are ever unfinished."""
  waited = []

  class Step:
    def __init__(self, index):
      self.index = index

    def block_until_ready(self):
      waited.append(self.index)
      return self

  in_flight = train.StepsInFlight(2)
  for index in range(5):
    in_flight.make_room()
    in_flight.dispatched(Step(index))
  assert waited == [0, 1, 2]
  # The default: the step before has finished when the next is dispatched.
  one_at_a_time = train.StepsInFlight()
  one_at_a_time.dispatched(Step(7))
  assert waited[-1] == 2
  one_at_a_time.make_room()
  assert waited[-1] == 7
  with pytest.raises(ValueError, match='at least 1'):
    train.StepsInFlight(0)


def test_steps_in_flight_pause_after_each_wait(monkeypatch):
  """After waiting for a step, StepsInFlight pauses (for XLA:CPU to free the
  step's temporaries) before the next dispatch; `finish` waits for all."""
  events = []

  class Step:
    def __init__(self, index):
      self.index = index

    def block_until_ready(self):
      events.append(f'waited {self.index}')
      return self

  monkeypatch.setattr(train.host_memory, 'pause_for_released_temporaries',
                      lambda seconds=None: events.append(f'paused {seconds}'))
  in_flight = train.StepsInFlight(2, pause_seconds=0.25)
  for index in range(3):
    in_flight.make_room()
    in_flight.dispatched(Step(index))
  assert events == ['waited 0', 'paused 0.25']
  in_flight.finish()
  assert events[2:] == ['waited 1', 'paused 0.25', 'waited 2', 'paused 0.25']
  in_flight.finish()  # Nothing left in flight.
  assert len(events) == 6


def test_evaluation_is_the_same_in_stacks_of_any_size():
  """`evaluate` runs `config.eval_batches_per_call` batches per compiled
  call; the stacks' completing batches of padding count for nothing."""
  config = multidevice_worker.make_config(SMALL)
  state = train.create_train_state(config, (28, 28, 1))
  rng = np.random.default_rng(0)
  examples = batching.Examples(  # 100 examples: 3 batches of 40.
      rng.random((100, 28, 28, 1), np.float32),
      rng.integers(0, 10, 100).astype(np.int32))
  eval_fn = jax.jit(functools.partial(train.eval_steps,
                                      apply_fn=state.apply_fn, config=config))
  results = {}
  for per_call in (1, 2, 8):  # 8: all 3 batches in one call.
    config.eval_batches_per_call = per_call
    results[per_call] = train.evaluate(eval_fn, models.variables(state),
                                       examples, config,
                                       parallel_lib.DataParallel())
  for per_call, metrics in results.items():
    assert metrics['count'] == 100, per_call
    assert metrics == pytest.approx(results[1], rel=1e-5), per_call
  assert 0 < results[1]['accuracy'] < 1


def test_reuse_requested_reads_the_flag_as_absl_does():
  """train/main.py decides before parsing its flags whether to start itself
  again with huge pages for malloc (train/host_memory.py)."""
  from train import main  # pylint: disable=g-import-not-at-top
  assert main.reuse_requested(['main', '--workdir=/tmp/caps'])
  assert main.reuse_requested(['main', '--reuse_host_memory=true'])
  assert not main.reuse_requested(['main', '--noreuse_host_memory'])
  for value in ('false', 'False', 'f', '0'):
    assert not main.reuse_requested(['main', f'--reuse_host_memory={value}'])
