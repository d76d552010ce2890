"""What a training run reports: the console (a progress line, a line per
epoch) and the files (metrics.jsonl, TensorBoard events), and the running
sums of the epoch in progress that checkpoints keep."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

from train import checkpoints

Metrics = dict[str, float]


class MetricsLog:
  """metrics.jsonl (one JSON object per record) and TensorBoard events.

  Only process 0 writes. A run resumed at step s first drops the records
  after s (and any test record) that the killed run wrote: they are written
  again, so no step is recorded twice.
  """

  def __init__(self, workdir: Path, resumed_step: int = 0):
    self._enabled = jax.process_index() == 0
    self._path = workdir / 'metrics.jsonl'
    self._tensorboard = None
    if self._enabled and self._path.exists():
      kept = []
      for line in self._path.read_text().splitlines():
        try:
          record = json.loads(line)
        except ValueError:  # A line cut by a kill.
          continue
        if record['step'] <= resumed_step and record['kind'] != 'test':
          kept.append(line + '\n')
      temporary = self._path.with_suffix('.tmp')
      temporary.write_text(''.join(kept))
      temporary.replace(self._path)
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, record: dict[str, Any]) -> None:
    if not self._enabled:
      return
    with self._path.open('a') as file:
      file.write(checkpoints.strict_json(record) + '\n')
    step = record['step']
    for name, value in record.items():
      if isinstance(value, float):
        self._tensorboard.add_scalar(f'{record["kind"]}/{name}', value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


class Progress:
  """tqdm's progress line (steps, rate, ETA and the latest metrics), printed
  by process 0: in place on a terminal, else as a new line every 30 s (so
  a log file holds one readable line per update)."""

  BAR_FORMAT = ('{percentage:3.0f}%|{bar:30}| step {n_fmt}/{total_fmt} '
                '[{elapsed}<{remaining}, {rate_fmt}{postfix}]')

  def __init__(self, first_step: int, total_steps: int):
    self._first_step = first_step
    self._total = total_steps
    self._start = time.monotonic()
    self._last_print = 0.0
    self._enabled = jax.process_index() == 0
    self._interactive = os.isatty(1)

  def update(self, step: int, metrics: Metrics | None = None,
             force: bool = False, step_outputs: Any = None) -> None:
    """Reports `step` as done. `step_outputs`: arrays the step computes;
    dispatch is asynchronous, so the bar waits for them before printing (at
    most once per print interval), or it would count steps merely queued."""
    interval = 0.5 if self._interactive else 30.0
    if not self._enabled or (not force and
                             time.monotonic() - self._last_print < interval):
      return
    if step_outputs is not None:
      jax.block_until_ready(step_outputs)
    now = time.monotonic()
    self._last_print = now
    text = tqdm.tqdm.format_meter(
        step, self._total, now - self._start, ascii=True, unit='step',
        initial=self._first_step, bar_format=self.BAR_FORMAT,
        postfix=' '.join(f'{k}={v:.4f}' for k, v in (metrics or {}).items())
        or None)
    print('\r' + text if self._interactive else text,
          end='' if self._interactive else '\n', flush=True)

  def close(self) -> None:
    if self._enabled and self._interactive:
      print(flush=True)


def format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm; nothing after it was saved."""


class EpochMetrics:
  """Running sums of the training metrics of the epoch in progress.

  A step's metrics stay on the device until `fold`, which adds them to the
  sums in step order (so the sums do not depend on when folds happen) and
  checks that the loss and gradient norm are finite. The sums go into every
  checkpoint, so the record of an epoch interrupted by a restart equals
  that of an uninterrupted one.
  """

  WATCHED = ('loss', 'gradient_norm')

  def __init__(self, saved: dict[str, Any] | None = None):
    saved = saved or {}
    self.sums: dict[str, float] = dict(saved.get('sums', {}))
    self.steps: int = saved.get('steps', 0)
    self._seconds: float = saved.get('seconds', 0.0)
    self._since = time.monotonic()
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def fold(self) -> Metrics:
    """Adds the pending steps to the sums and returns their means.

    Raises:
      TrainingDiverged: a watched metric is not finite (the sums keep only
        the steps before it).
    """
    pending, self._pending = self._pending, []
    if not pending:
      return {}
    values = jax.device_get([metrics for _, metrics in pending])
    for (step, _), record in zip(pending, values):
      for name in self.WATCHED:
        if not math.isfinite(float(record[name])):
          raise TrainingDiverged(
              f'step {step}: {name} is {float(record[name])}')
      for name, value in record.items():
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
      self.steps += 1
    return {name: float(np.mean([record[name] for record in values]))
            for name in values[0]}

  def seconds(self) -> float:
    """Training seconds of this epoch, over every restart."""
    return self._seconds + time.monotonic() - self._since

  def means(self) -> Metrics:
    return {name: total / self.steps for name, total in self.sums.items()}

  def state(self) -> dict[str, Any]:
    """What a checkpoint keeps (call after `fold`)."""
    return {'sums': dict(self.sums), 'steps': self.steps,
            'seconds': self.seconds()}


def epoch_line(record: dict[str, Any]) -> str:
  """An epoch record for people (the JSON goes to metrics.jsonl)."""
  line = (f"epoch {record['epoch']:g} (step {record['step']}, "
          f"{format_seconds(record['seconds'])}): "
          f"train loss {record['train_loss']:.4f} "
          f"accuracy {100 * record['train_accuracy']:.2f}%")
  if 'validation_accuracy' not in record:  # config.validation_size = 0
    return line
  return (f"{line} | validation loss {record['validation_loss']:.4f} "
          f"accuracy {100 * record['validation_accuracy']:.2f}%")


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_reconstructions_png(path: Path, images: np.ndarray,
                             labels: np.ndarray, predictions: np.ndarray,
                             reconstructions: np.ndarray,
                             per_row: int = 8) -> None:
  """Pairs (image | reconstruction) in a grid, titled 'P:pred L:true'."""
  plt = pyplot()
  count = len(images)
  rows = -(-count // per_row)
  figure, axes = plt.subplots(rows, 2 * per_row,
                              figsize=(1.1 * 2 * per_row, 1.3 * rows),
                              squeeze=False)
  for axis in axes.ravel():
    axis.set_axis_off()
  for index in range(count):
    row, col = divmod(index, per_row)
    left, right = axes[row, 2 * col], axes[row, 2 * col + 1]
    left.imshow(images[index, ..., 0], cmap='gray', vmin=0, vmax=1)
    right.imshow(reconstructions[index, ..., 0], cmap='gray', vmin=0, vmax=1)
    # Two-label examples (MultiMNIST): right if it is one of the labels.
    correct = np.isin(predictions[index], labels[index]).all()
    colour = 'black' if correct else 'red'
    left.set_title(f'L:{labels[index]}', fontsize=7)
    right.set_title(f'P:{predictions[index]}', fontsize=7, color=colour)
  figure.suptitle('test digit (left), reconstruction from the longest '
                  'capsule (right)', fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
