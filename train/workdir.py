"""A training workdir: one run's folder, its lock, and its config.

The workdir's `config.json` is the run's identity. A rerun in the same
workdir resumes that run; it may change only what does not change the
model, the data or the optimisation (`CHANGEABLE_FIELDS`). Everything is
checked before anything is written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from train.configs import default as default_config

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'

# Fields a rerun may change: how long, how often to evaluate, checkpoint and
# log, where the (verified) data files are, how devices are found, and how a
# convolution is computed (the same maths).
CHANGEABLE_FIELDS = frozenset({
    'num_epochs', 'max_steps', 'stop_at_validation_accuracy',
    'checkpoint_every_steps', 'keep_checkpoints',
    'log_every_steps', 'num_reconstructions', 'eval_batch_size',
    'eval_batches_per_call', 'data_dir',
    'tfds_data_dir', 'distributed', 'coordinator_address', 'num_processes',
    'process_id', 'model.conv_method',
})
# Shortcuts that alias another field (reported under that field).
ALIASES = frozenset({'routing_iterations'})


class WorkdirError(ValueError):
  """The workdir cannot be used; the message names it and why."""


def prepare(workdir: str | os.PathLike) -> Path:
  """The workdir as an absolute path, created if needed and writable."""
  path = Path(workdir).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir={path}: exists and is not a folder')
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test.{os.getpid()}'
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as error:
    reason = {errno.EACCES: 'not writable (permission denied)',
              errno.EPERM: 'not writable (operation not permitted)',
              errno.EROFS: 'on a read-only file system',
              errno.ENOSPC: 'no space left on device'}.get(
                  error.errno, error.strerror or str(error))
    raise WorkdirError(f'--workdir={path}: {reason}') from error
  return path


class Lock:
  """An exclusive lock on a workdir, held until the process ends.

  `fcntl.flock`: the kernel releases it when the process dies, however it
  dies, so a killed run never leaves a stale lock.
  """

  def __init__(self, workdir: Path):
    self.path = workdir / LOCK_FILE
    self._file = self.path.open('a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'unknown'
      self._file.close()
      raise WorkdirError(
          f'--workdir={workdir}: in use by another run (pid {holder}); wait '
          'for it to end or choose another --workdir') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'{os.getpid()}\n')
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{name}.'))
    else:
      flat[f'{prefix}{name}'] = value
  return flat


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as it is written to (and read back from) config.json."""
  return json.loads(config.to_json_best_effort())


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict,
                   defaults: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} of every field that differs.

  A field the saved config lacks (it predates the field) counts as having
  its default value.
  """
  old = _flatten(saved)
  new = _flatten(as_json(config))
  default = _flatten(as_json(defaults))
  changes = {}
  for field in sorted(set(old) | set(new)):
    if field in ALIASES:
      continue
    before = old.get(field, default.get(field))
    after = new.get(field, default.get(field))
    if before != after:
      changes[field] = (before, after)
  return changes


def check_config(workdir: Path, config: ml_collections.ConfigDict,
                 defaults: ml_collections.ConfigDict,
                 allow_changes: bool = False) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the workdir's saved one; writes nothing.

  Returns:
    The changes (empty for a new workdir or the same config).

  Raises:
    WorkdirError: the config changes a field outside `CHANGEABLE_FIELDS`
      and `allow_changes` is False; the message names every such field.
  """
  path = workdir / CONFIG_FILE
  if not path.exists():
    return {}
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise WorkdirError(f'{path}: unreadable ({error}); move it away to '
                       'start afresh in this workdir') from error
  changes = config_changes(saved, config, defaults)
  refused = {field: values for field, values in changes.items()
             if field not in CHANGEABLE_FIELDS}
  if refused and not allow_changes:
    listed = ', '.join(f'{field} {before!r} -> {after!r}'
                       for field, (before, after) in refused.items())
    raise WorkdirError(
        f'--workdir={workdir} holds a run with a different config ({listed}); '
        'use a new --workdir to start afresh, or --allow_config_change to '
        'resume this run with the new values')
  return changes


def save_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (strict JSON), atomically."""
  path = workdir / CONFIG_FILE
  temporary = path.with_suffix('.tmp')
  temporary.write_text(json.dumps(as_json(config), indent=2,
                                  allow_nan=False) + '\n')
  temporary.replace(path)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run was started with (`workdir/config.json`); the default
  config, with a warning, for workdirs from before config.json existed."""
  path = Path(workdir) / CONFIG_FILE
  if path.is_file():
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  print(f'warning: {path} not found; assuming the default config',
        flush=True)
  return default_config.get_config()
