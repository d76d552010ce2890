"""Checkpoints of a training run: orbax, verified before use.

`workdir/checkpoints/<step>/` holds orbax's checkpoint of the train state and
a JSON progress record; orbax keeps the last K and the best one on
validation accuracy (`CheckpointManager.best_step`, the one source of truth
for "best": ties go to the later step, for orbax's policy and for us alike).

Damage is detected, never trained on. Once a save has finished, the SHA-256
of every file of that step goes to `workdir/checkpoint_checksums/<step>.json`;
before orbax reads anything, every step is checked against its checksums
(or, for the newest step when the run died before writing them, its JSON
files are parsed). A step that fails any check, or that orbax then fails to
restore, is reported with a warning naming it and moved to
`workdir/unreadable_checkpoints/` (never deleted), and the next one is used;
if the best was lost, the best of those that remain is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from train import parallel

VALIDATION_ACCURACY = 'validation_accuracy'


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'opt_state/0/mu/conv1/kernel': shape} of a train state or of orbax's
  metadata of one (whose dicts, lists and named tuples name the same
  paths)."""
  def name(key) -> str:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)
  return {'/'.join(name(key) for key in path):
              tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (e.g. a full disk); the message names
  it. The checkpoints saved before it are untouched."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """An exception's message on one line (TensorStore's span many)."""
  text = ' '.join(str(error).split())
  return text if len(text) <= limit else text[:limit] + '...'


def file_checksums(directory: Path) -> dict[str, str]:
  """{path relative to `directory`: sha256} of every file under it."""
  checksums = {}
  for path in sorted(directory.rglob('*')):
    if path.is_file():
      digest = hashlib.sha256()
      with path.open('rb') as file:
        for chunk in iter(lambda: file.read(1 << 22), b''):  # pylint: disable=cell-var-from-loop
          digest.update(chunk)
      checksums[str(path.relative_to(directory))] = digest.hexdigest()
  return checksums


def _validation_accuracy(metrics: dict[str, float]) -> float:
  return metrics[VALIDATION_ACCURACY]


class Checkpoints:
  """The checkpoints of one workdir.

  Args:
    workdir: the run's folder.
    keep: how many of the newest checkpoints to keep (the best on validation
      is kept in addition).
    read_only: never write, move or delete anything (for commands that only
      read a finished run); damage is still detected and the step skipped.
  """

  def __init__(self, workdir: str | Path, keep: int, read_only: bool = False):
    workdir = Path(workdir).expanduser().absolute()
    self.directory = workdir / 'checkpoints'
    self.checksums_directory = workdir / 'checkpoint_checksums'
    self.quarantine = workdir / 'unreadable_checkpoints'
    self._keep = keep
    self._read_only = read_only
    self._skipped: set[int] = set()  # Damaged steps, in read-only mode.
    self._verify_all()
    self.manager = self._open()

  # -- orbax -----------------------------------------------------------------

  def _open(self) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=self._keep),
            policies.BestN(get_metric_fn=_validation_accuracy, n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        # Only with best_fn set does orbax write the metrics to disk; without
        # them, after a restart BestN sees none and deletes the best
        # checkpoint at the next save.
        best_fn=_validation_accuracy,
        best_mode='max',
        enable_async_checkpointing=not self._read_only,
        read_only=self._read_only,
        create=not self._read_only,
    )
    return ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """The usable steps, oldest first."""
    return sorted(set(self.manager.all_steps()) - self._skipped)

  def best_step(self) -> int | None:
    """The step with the best validation accuracy (the later one of a
    tie, as orbax's `best_step` and its BestN policy), or None if no
    checkpoint has a validation accuracy."""
    scored = [(accuracy, step) for step in self.steps()
              if (accuracy := self.validation_accuracy(step)) is not None]
    return max(scored)[1] if scored else None

  def validation_accuracy(self, step: int) -> float | None:
    metrics = self.manager.metrics(step)
    return None if metrics is None else _validation_accuracy(metrics)

  def save(self, step: int, state, progress: dict[str, Any],
           validation_accuracy: float | None = None) -> None:
    """Starts saving asynchronously (after the previous save finished)."""
    self.wait()
    metrics = (None if validation_accuracy is None else
               {VALIDATION_ACCURACY: validation_accuracy})
    try:
      self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              progress=ocp.args.JsonSave(progress),
          ),
          metrics=metrics,
      )
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_error(step, error) from error

  def wait(self) -> None:
    """Waits for the pending save; then records the checksums of every
    finished step that has none and forgets those of deleted steps."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_error(self.manager.latest_step(), error) from error
    if self._read_only or jax.process_index() != 0:
      return
    steps = set(self.manager.all_steps())
    self.checksums_directory.mkdir(exist_ok=True)
    for path in self.checksums_directory.glob('*.json'):
      if path.stem.isdigit() and int(path.stem) not in steps:
        path.unlink()
    for step in steps:
      path = self._checksums_path(step)
      if not path.exists():
        temporary = path.with_suffix('.tmp')
        temporary.write_text(json.dumps(
            file_checksums(self.directory / str(step)), indent=0))
        temporary.replace(path)

  def _save_error(self, step, error: Exception) -> CheckpointError:
    cause = error
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    reason = ('no space left on device'
              if isinstance(cause, OSError) and cause.errno == errno.ENOSPC
              else f'{type(error).__name__}: {one_line(error)}')
    return CheckpointError(
        f'could not save the checkpoint of step {step} in {self.directory}: '
        f'{reason}; the checkpoints saved before it are kept')

  def close(self) -> None:
    self.wait()
    self.manager.close()

  # -- reading ---------------------------------------------------------------

  def restore(self, step: int, abstract_state):
    """(state, progress) of `step`; raises if it cannot be read."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            progress=ocp.args.JsonRestore(),
        ),
    )
    return restored['state'], restored['progress']

  def layout_difference(self, abstract_state) -> str | None:
    """What differs between the arrays of the newest checkpoint and those
    of `abstract_state` (paths and shapes), e.g. 'opt_state/1/total_weight:
    not in the checkpoint'; None if nothing does, if there is no
    checkpoint, or if its metadata cannot be read (then restoring it
    decides).

    A config change that alters the parameters or the optimizer state
    cannot resume from these checkpoints: restoring them would fail and
    set every one of them aside as unreadable.
    """
    steps = self.steps()
    if not steps:
      return None
    state_directory = (self.directory / str(steps[-1]) / 'state').absolute()
    try:
      saved = ocp.PyTreeCheckpointer().metadata(
          state_directory).item_metadata.tree
    except Exception:  # pylint: disable=broad-except
      return None
    saved_shapes, wanted = _leaf_shapes(saved), _leaf_shapes(abstract_state)
    if not saved_shapes:
      return None
    differences = (
        [f'{path}: not in the checkpoint' for path in wanted
         if path not in saved_shapes] +
        [f'{path}: only in the checkpoint' for path in saved_shapes
         if path not in wanted] +
        [f'{path}: {saved_shapes[path]} in the checkpoint, {wanted[path]} now'
         for path in wanted
         if path in saved_shapes and saved_shapes[path] != wanted[path]])
    if not differences:
      return None
    more = len(differences) - 3
    return '; '.join(differences[:3]) + (f' and {more} more' if more > 0
                                         else '')

  def restore_latest(self, abstract_state):
    """(state, progress) of the newest readable checkpoint, or None."""
    return self._restore_first(self.steps()[::-1], abstract_state)

  def restore_best(self, abstract_state):
    """(state, progress) of the best readable checkpoint on validation (the
    newest if none has a validation accuracy), or None if none is
    readable."""
    while True:
      best = self.best_step()
      if best is None:
        return self.restore_latest(abstract_state)
      restored = self._restore_first([best], abstract_state)
      if restored is not None:
        return restored

  def _restore_first(self, steps: list[int], abstract_state):
    for step in steps:
      try:
        return self.restore(step, abstract_state)
      except Exception as error:  # pylint: disable=broad-except
        self._set_aside(step, f'{type(error).__name__}: {one_line(error)}')
        self.manager.close()
        self.manager = self._open()
    return None

  # -- integrity -------------------------------------------------------------

  def _checksums_path(self, step: int) -> Path:
    return self.checksums_directory / f'{step}.json'

  def _verify_all(self) -> None:
    """Sets aside every step that fails its checksums (or, without them,
    whose JSON files do not parse), before orbax reads any of them.

    Every process passes the barrier, whatever it found: whether the
    directory exists yet is no condition for it, since another process may
    be creating it at that moment (and would then never meet this one)."""
    problems = {}
    if self.directory.is_dir() and (jax.process_index() == 0
                                    or self._read_only):
      for path in sorted(self.directory.iterdir()):
        if path.name.isdigit() and path.is_dir():
          problem = self._problem(int(path.name))
          if problem:
            problems[int(path.name)] = problem
    for step, problem in problems.items():
      self._set_aside(step, problem, sync=False)
    if not self._read_only:
      parallel.wait_for_all_processes('checkpoints verified')

  def _problem(self, step: int) -> str | None:
    """Why `step` cannot be trusted, or None."""
    folder = self.directory / str(step)
    try:
      expected = json.loads(self._checksums_path(step).read_text())
    except (OSError, ValueError):
      expected = None
    if expected is not None:
      actual = file_checksums(folder)
      damaged = sorted(name for name in set(expected) | set(actual)
                       if expected.get(name) != actual.get(name))
      return (f'{len(damaged)} file(s) differ from their checksums at save, '
              f'e.g. {damaged[0]}') if damaged else None
    for path in folder.rglob('*'):
      if path.is_file() and (path.name in ('_CHECKPOINT_METADATA', 'metrics')
                             or path.parent.name == 'progress'
                             and path.name == 'metadata'):
        try:
          json.loads(path.read_text())
        except (OSError, ValueError) as error:
          return f'{path.relative_to(folder)}: {one_line(error)}'
    return None

  def _set_aside(self, step: int, problem: str, sync: bool = True) -> None:
    folder = self.directory / str(step)
    if self._read_only:
      print(f'warning: checkpoint {folder} is unreadable ({problem}); '
            'skipping it', flush=True)
      self._skipped.add(step)
      return
    destination = self.quarantine / f'{step}-{int(time.time())}'
    message = (f'checkpoint {folder} is unreadable ({problem}); moved to '
               f'{destination}; using the previous one')
    logging.error('%s', message)
    if jax.process_index() == 0:
      print(f'warning: {message}', flush=True)
      self.quarantine.mkdir(parents=True, exist_ok=True)
      shutil.move(str(folder), str(destination))
      checksums = self._checksums_path(step)
      if checksums.exists():
        checksums.replace(destination.with_suffix('.checksums.json'))
    if sync:
      parallel.wait_for_all_processes(f'set aside checkpoint {step}')


def strict_json(record: Any, **kwargs) -> str:
  """json.dumps that refuses NaN and infinity (which are not JSON)."""
  return json.dumps(record, allow_nan=False, **kwargs)

