"""Training and evaluation of CapsNet: `train_and_evaluate(config, workdir)`.

Data parallel over every device of every host: a 1-D mesh named 'data', the
batch sharded along it, parameters and optimizer state replicated, one
`jax.jit`-compiled step (XLA inserts the gradient all-reduce). This is the
`jax.sharding` replacement of `pmap`, and runs unchanged on one CPU, several
devices, or several hosts.

Resuming needs only the checkpoint: the training batch of a step is a pure
function of (seed, step) (see `input_pipeline.train_batch`), there is no
other randomness, and the learning-rate schedule reads the step from the
optimizer state.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import capsjax
from capsjax import losses
from train import checkpoints as checkpoints_lib
from train import experiments
from train import input_pipeline
from train import workdir as workdir_lib
from train.checkpoints import Checkpoints
from train.datasets import DataError

DATASETS = ('mnist', 'fashion_mnist') + experiments.DATASETS
PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NUM_CLASSES = 10
Metrics = dict[str, float]


class ConfigError(ValueError):
  """An impossible or unknown setting; the message names the field."""


# ---------------------------------------------------------------------------
# Configuration checks, before anything is compiled.


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int = 1) -> None:
  """Raises ConfigError naming the first impossible field."""

  def require(condition: bool, field: str, message: str) -> None:
    if not condition:
      raise ConfigError(
          f'config.{field}={config_value(config, field)!r}: {message}')

  require(config.dataset in DATASETS, 'dataset', f'must be one of {DATASETS}')
  for field, message in experiments.config_problems(config):
    require(False, field, message)
  require(not config.data_dir or Path(config.data_dir).expanduser().is_dir(),
          'data_dir', 'no such directory')
  require(config.model.routing_iterations >= 1, 'model.routing_iterations',
          'must be >= 1')
  require(config.precision in PRECISIONS, 'precision',
          f'must be one of {tuple(PRECISIONS)}')
  require(conv_method(config) in capsjax.convolution.METHODS,
          'model.conv_method',
          f'must be one of {capsjax.convolution.METHODS}')
  for field in ('batch_size', 'eval_batch_size'):
    require(config[field] >= 1, field, 'must be >= 1')
    require(config[field] % num_devices == 0, field,
            f'must divide evenly over the {num_devices} devices')
    require(config[field] % num_processes == 0, field,
            f'must divide evenly over the {num_processes} processes')
  require(config.num_epochs >= 1 or config.max_steps >= 1, 'num_epochs',
          'must be >= 1 (or set max_steps)')
  for field in ('learning_rate', 'learning_rate_decay_rate',
                'reconstruction_weight', 'margin_positive', 'margin_negative',
                'absent_class_weight', 'model.primary_capsule_scale'):
    value = config_value(config, field)
    require(isinstance(value, (int, float)) and math.isfinite(value), field,
            'must be a finite number')
  require(config.learning_rate > 0, 'learning_rate', 'must be > 0')
  require(0 < config.learning_rate_decay_rate <= 1, 'learning_rate_decay_rate',
          'must be in (0, 1]')
  require(config.learning_rate_decay_steps >= 1, 'learning_rate_decay_steps',
          'must be >= 1')
  require(config.reconstruction_weight >= 0, 'reconstruction_weight',
          'must be >= 0')
  require(config.max_shift >= 0, 'max_shift', 'must be >= 0')
  require(config.checkpoint_every_steps >= 1, 'checkpoint_every_steps',
          'must be >= 1')
  require(config.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1')
  require(config.log_every_steps >= 1, 'log_every_steps', 'must be >= 1')
  require(config.seed >= 0, 'seed', 'must be >= 0')
  distributed_mode(config)
  num_train = (config.num_train_examples if config.num_train_examples > 0
               else 60000 - config.validation_size)
  require(config.batch_size <= num_train, 'batch_size',
          f'is larger than the {num_train} training examples')


def config_value(config: ml_collections.ConfigDict, dotted_field: str) -> Any:
  value = config
  for part in dotted_field.split('.'):
    value = value[part]
  return value


# ---------------------------------------------------------------------------
# Model, optimizer, state.


def conv_method(config: ml_collections.ConfigDict) -> str:
  # config.json of workdirs from before the field: the default.
  return config.model.get('conv_method', 'auto')


def create_model(config: ml_collections.ConfigDict) -> capsjax.CapsNet:
  if experiments.is_baseline(config):  # config.model.name
    return experiments.create_baseline(config, PRECISIONS[config.precision],
                                       conv_method(config))
  model_config = config.model
  return capsjax.CapsNet(
      num_classes=NUM_CLASSES,
      routing_iterations=model_config.routing_iterations,
      use_decoder=config.reconstruction_weight > 0,
      conv_features=model_config.conv_features,
      primary_capsule_types=model_config.primary_capsule_types,
      primary_capsule_dim=model_config.primary_capsule_dim,
      primary_capsule_scale=model_config.primary_capsule_scale,
      class_capsule_dim=model_config.class_capsule_dim,
      decoder_hidden_sizes=tuple(model_config.decoder_hidden_sizes),
      stop_gradient_intermediate=model_config.stop_gradient_intermediate,
      dtype=PRECISIONS[config.precision],
      conv_method=conv_method(config),
  )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * decay_rate ** (step / decay_steps), the official code's schedule."""
  return optax.exponential_decay(
      init_value=config.learning_rate,
      transition_steps=config.learning_rate_decay_steps,
      decay_rate=config.learning_rate_decay_rate,
  )


def create_train_state(config: ml_collections.ConfigDict,
                       image_shape: tuple[int, ...]) -> train_state.TrainState:
  model = create_model(config)
  images = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(jax.random.key(config.seed), images,
                      jnp.zeros((1,), jnp.int32))['params']
  return train_state.TrainState.create(
      apply_fn=model.apply,
      params=params,
      tx=optax.adam(learning_rate_schedule(config)),
  )


# ---------------------------------------------------------------------------
# Steps.


def per_example_losses(output: capsjax.CapsNetOutput, images: jax.Array,
                       labels: jax.Array,
                       config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Margin, reconstruction and total loss, each `(batch,)`."""
  margin = losses.margin_loss(
      output.lengths,
      jax.nn.one_hot(labels, NUM_CLASSES),
      margin_positive=config.margin_positive,
      margin_negative=config.margin_negative,
      absent_class_weight=config.absent_class_weight,
  )
  if output.reconstructions is None:
    reconstruction = jnp.zeros_like(margin)
  else:
    reconstruction = losses.reconstruction_loss(
        output.reconstructions, images, weight=config.reconstruction_weight)
  return {
      'loss': margin + reconstruction,
      'margin_loss': margin,
      'reconstruction_loss': reconstruction,
      'accuracy': (jnp.argmax(output.lengths, -1) == labels).astype(
          jnp.float32),
  }


def batch_losses(output, batch: dict[str, jax.Array],
                 config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """`per_example_losses`, or the baselines' and MultiMNIST's."""
  if experiments.has_own_losses(config):
    return experiments.per_example_losses(output, batch, config)
  return per_example_losses(output, batch['image'], batch['label'], config)


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array],
               config: ml_collections.ConfigDict):
  """One Adam step on the mean loss of a (global) batch."""

  def loss_fn(params):
    # In training the decoder reconstructs from the label's capsule.
    output = experiments.apply_model(state.apply_fn, params, batch, config,
                                     train=True, step=state.step)
    per_example = batch_losses(output, batch, config)
    means = {name: jnp.mean(value) for name, value in per_example.items()}
    return means['loss'], means

  gradients, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
  # Watched by the loop: a non-finite one stops the run before it is saved.
  metrics['gradient_norm'] = optax.tree.norm(gradients)
  return state.apply_gradients(grads=gradients), metrics


def eval_step(params, batch: dict[str, jax.Array], apply_fn,
              config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Sums of the per-example metrics over the real (mask = 1) rows."""
  # Without labels the decoder reconstructs from the longest capsule.
  output = experiments.apply_model(apply_fn, params, batch, config,
                                   train=False)
  per_example = batch_losses(output, batch, config)
  sums = {name: jnp.sum(value * batch['mask'])
          for name, value in per_example.items()}
  sums['count'] = jnp.sum(batch['mask'])
  return sums


# ---------------------------------------------------------------------------
# Devices and hosts.


def distributed_mode(config: ml_collections.ConfigDict) -> bool | str:
  """config.distributed as True, False or 'auto'.

  The field is a string (its default is 'auto'), so the command line gives
  'True' or 'False'; any case is accepted.
  """
  value = config.distributed
  if isinstance(value, str):
    value = {'true': True, 'false': False, 'auto': 'auto'}.get(value.lower())
  if value not in (True, False, 'auto'):
    raise ConfigError(f'config.distributed={config.distributed!r}: must be '
                      "True, False or 'auto'")
  return value


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when asked to, before devices are used."""
  mode = distributed_mode(config)
  if mode is False:
    return
  explicit = bool(config.coordinator_address)
  if mode == 'auto' and not explicit and not any(
      variable in os.environ for variable in (
          'SLURM_JOB_ID', 'JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES',
          'OMPI_COMM_WORLD_SIZE')):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if explicit:
    if config.num_processes < 1:
      raise ConfigError(f'config.num_processes={config.num_processes}: must '
                        'be >= 1 with a coordinator_address')
    if not 0 <= config.process_id < config.num_processes:
      raise ConfigError(f'config.process_id={config.process_id}: must be in '
                        f'[0, {config.num_processes}) with a '
                        'coordinator_address')
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes,
                  process_id=config.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as error:  # E.g. no coordinator given or detected.
    raise ConfigError(
        f'config.distributed={config.distributed!r}: {error} (off a managed '
        'cluster, set coordinator_address, num_processes and process_id)'
    ) from error


def wait_for_all_processes(name: str, timeout_seconds: int = 3600) -> None:
  """A barrier of all processes, through the jax.distributed coordination
  service (a no-op with one process). `name` must be unique.

  Unlike `multihost_utils.sync_global_devices`, it runs no device
  collective: on CPU, that one's gloo rendezvous gives up after 30 s, less
  than preparing a dataset can take.
  """
  ocp.multihost.get_barrier_sync_fn()(key=name,
                                      timeout_ms=timeout_seconds * 1000)


class DataParallel:
  """A 1-D device mesh: batches sharded along 'data', state replicated."""

  def __init__(self):
    self.mesh = Mesh(np.array(jax.devices()), ('data',))
    self.batch = NamedSharding(self.mesh, PartitionSpec('data'))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  def global_batch(self, local_batch: dict[str, np.ndarray]):
    """This process's rows -> one global array per field, sharded."""
    return {
        name: jax.make_array_from_process_local_data(self.batch, value)
        for name, value in local_batch.items()
    }

  def replicate(self, host_array: np.ndarray) -> jax.Array:
    """The same host array on every process -> replicated global array."""
    return jax.make_array_from_process_local_data(self.replicated, host_array)


# ---------------------------------------------------------------------------
# Logging.


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
      file.write(checkpoints_lib.strict_json(record) + '\n')
    step = record['step']
    for name, value in record.items():
      if isinstance(value, float):
        self._tensorboard.add_scalar(f'{record["kind"]}/{name}', value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


class Progress:
  """A one-line progress bar with steps/s and ETA (process 0 only)."""

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
    done = step - self._first_step
    rate = done / max(now - self._start, 1e-9)
    remaining = (self._total - step) / rate if rate > 0 else float('inf')
    width = 30
    filled = int(width * step / max(self._total, 1))
    bar = '#' * filled + '.' * (width - filled)
    text = (f'[{bar}] step {step}/{self._total} {rate:.2f} steps/s '
            f'ETA {_format_seconds(remaining)}')
    if metrics:
      text += ' ' + ' '.join(f'{k}={v:.4f}' for k, v in metrics.items())
    print('\r' + text if self._interactive else text,
          end='' if self._interactive else '\n', flush=True)

  def close(self) -> None:
    if self._enabled and self._interactive:
      print(flush=True)


def _format_seconds(seconds: float) -> str:
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


# ---------------------------------------------------------------------------
# Evaluation and figures.


def evaluate(eval_fn, params, images: np.ndarray, labels: np.ndarray,
             config: ml_collections.ConfigDict,
             parallel: DataParallel) -> Metrics:
  """Mean metrics over every example (the last partial batch included)."""
  totals: dict[str, float] = {}
  for batch in experiments.eval_batches(
      images, labels, config.eval_batch_size, jax.process_index(),
      jax.process_count()):
    sums = jax.device_get(eval_fn(params, parallel.global_batch(batch)))
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  count = totals.pop('count')
  metrics = {name: value / count for name, value in totals.items()}
  metrics['count'] = int(count)
  return metrics


def save_reconstructions(path: Path, images: np.ndarray, labels: np.ndarray,
                         output: capsjax.CapsNetOutput) -> None:
  """A PNG: test images (top) above their reconstructions (bottom)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  predictions = np.argmax(output.lengths, -1)
  count = len(images)
  figure, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.8))
  for column in range(count):
    axes[0, column].imshow(images[column, ..., 0], cmap='gray', vmin=0, vmax=1)
    axes[0, column].set_title(f'true {labels[column]}', fontsize=8)
    axes[1, column].imshow(output.reconstructions[column, ..., 0], cmap='gray',
                           vmin=0, vmax=1)
    axes[1, column].set_title(f'pred {predictions[column]}', fontsize=8)
  for axis in axes.ravel():
    axis.set_axis_off()
  figure.suptitle('test images (top) and reconstructions from the longest '
                  'capsule (bottom)', fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


# ---------------------------------------------------------------------------
# The loop.


def _limit(images: np.ndarray, labels: np.ndarray, limit: int):
  return (images, labels) if limit <= 0 else (images[:limit], labels[:limit])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains, keeps the best checkpoint on validation, tests it.

  Everything about the config and the workdir is checked before anything is
  written or compiled; a rerun in the same workdir resumes the run.

  Args:
    config: the run's config (`train/configs/default.py`).
    workdir: the run's folder; a rerun must keep the config of the run in it
      except for `workdir.CHANGEABLE_FIELDS`, unless `allow_config_change`.
    allow_config_change: resume the run in `workdir` with this config even
      where it changes the model, data or optimisation.

  Returns:
    The final test metrics of the best-on-validation checkpoint and where it
    came from (also written to `workdir/test_results.json`).

  Raises:
    ConfigError: an impossible setting, or an unusable workdir or data.
    TrainingDiverged: a non-finite loss or gradient norm.
    checkpoints.CheckpointError: a checkpoint could not be saved.
  """
  maybe_initialize_distributed(config)
  validate_config(config, jax.device_count(), jax.process_count())
  try:
    workdir_path = workdir_lib.prepare(workdir)
    lock = workdir_lib.Lock(workdir_path) if jax.process_index() == 0 else None
    from train.configs import default  # pylint: disable=g-import-not-at-top
    config_changes = workdir_lib.check_config(
        workdir_path, config, default.get_config(), allow_config_change)
  except workdir_lib.WorkdirError as error:
    raise ConfigError(str(error)) from error
  try:
    return _train_and_evaluate(config, workdir_path, config_changes)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir_path: Path,
                        config_changes: dict[str, Any]) -> dict[str, Any]:
  # Data: process 0 prepares the tfds files once, the others then read them.
  tfds_data_dir = os.path.expanduser(config.tfds_data_dir)
  load = functools.partial(input_pipeline.load_splits,
                           experiments.source_dataset(config),
                           config.data_dir, tfds_data_dir,
                           config.validation_size)
  try:
    if jax.process_index() == 0:
      splits = load()
    wait_for_all_processes('dataset prepared')
    if jax.process_index() != 0:
      splits = load()
    # Together to the first device collective (which can wait only 30 s).
    wait_for_all_processes('dataset loaded')
  except DataError as error:
    field = 'data_dir' if config.data_dir else 'dataset'
    raise ConfigError(
        f'config.{field}={config[field]!r}: {error}') from error
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir_path, config)  # read by robustness.py
  train_data = _limit(splits.train_images, splits.train_labels,
                      config.num_train_examples)
  validation = _limit(splits.validation_images, splits.validation_labels,
                      config.num_eval_examples)
  test = _limit(splits.test_images, splits.test_labels,
                config.num_eval_examples)
  # MultiMNIST pairs, affNIST canvases (unchanged for MNIST).
  train_data, validation, test = experiments.prepare_data(
      config, train_data, validation, test)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_data[1]),
                                                   config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = (config.max_steps if config.num_epochs < 1 else
                   min(total_steps, config.max_steps))
  image_shape = experiments.image_shape(config, train_data)

  parallel = DataParallel()
  state = jax.jit(functools.partial(create_train_state, config, image_shape),
                  out_shardings=parallel.replicated)()
  checkpoints = Checkpoints(workdir_path, config.keep_checkpoints)
  progress_record: dict[str, Any] = {}
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state, progress_record = restored
    state = jax.device_put(state, parallel.replicated)
    logging.info('Resumed from step %d.', int(state.step))
    if jax.process_index() == 0:
      print(f'resumed from the checkpoint at step {int(state.step)}',
            flush=True)

  step_fn = jax.jit(functools.partial(train_step, config=config),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, apply_fn=state.apply_fn,
                                      config=config))
  first_step = int(state.step)
  metrics_log = MetricsLog(workdir_path, resumed_step=first_step)
  if config_changes:
    metrics_log.write({'kind': 'config_change', 'step': first_step,
                       'changes': config_changes})
  if jax.process_index() == 0:
    print(f'{experiments.model_name(config)} on {config.dataset}, '
          f'{total_steps} steps ({steps_per_epoch} an epoch), batch '
          f'{config.batch_size}, {config.precision}, {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s), workdir {workdir_path}',
          flush=True)
  progress = Progress(first_step, total_steps)
  epoch = EpochMetrics(progress_record.get('epoch'))
  train_seconds = progress_record.get('train_seconds', 0.0)
  run_start = time.monotonic()
  batches = input_pipeline.prefetch(
      experiments.train_batches(
          config, train_data, config.batch_size, config.seed,
          start_step=first_step, num_steps=max(total_steps - first_step, 0),
          process_index=jax.process_index(),
          process_count=jax.process_count(), max_shift=config.max_shift))
  try:
    for step in range(first_step + 1, total_steps + 1):
      state, metrics = step_fn(state, parallel.global_batch(next(batches)))
      epoch.add(step, metrics)
      end_of_epoch = step % steps_per_epoch == 0
      saving = (end_of_epoch or step == total_steps or
                step % config.checkpoint_every_steps == 0)
      if step % config.log_every_steps == 0 or saving:
        recent = epoch.fold()
        if step % config.log_every_steps == 0:
          progress.update(step, recent)
      else:
        progress.update(step, step_outputs=metrics)
      if not saving:
        continue
      validation_accuracy = None
      if end_of_epoch or step == total_steps:
        validation_metrics = evaluate(eval_fn, state.params, *validation,
                                      config, parallel)
        validation_accuracy = validation_metrics['accuracy']
        record = {
            'kind': 'epoch', 'step': step,
            'epoch': step / steps_per_epoch,
            'seconds': epoch.seconds(),
            **{f'train_{k}': v for k, v in epoch.means().items()},
            **{f'validation_{k}': v for k, v in validation_metrics.items()
               if k != 'count'},
        }
        metrics_log.write(record)
        progress.update(step, force=True)
        if jax.process_index() == 0:
          print('\n' + _epoch_line(record), flush=True)
        if end_of_epoch:  # A run's last, partial epoch goes on if resumed.
          epoch = EpochMetrics()
      checkpoints.save(step, state, {
          'epoch': epoch.state(),
          'train_seconds': train_seconds + time.monotonic() - run_start,
      }, validation_accuracy)
  except TrainingDiverged as error:
    checkpoints.wait()
    last = checkpoints.steps()
    raise TrainingDiverged(
        f'training diverged at {error}; stopped without saving it; the last '
        'good checkpoint is ' + (f'step {last[-1]} in {checkpoints.directory}'
                                 if last else 'none (none was saved)')
    ) from None
  finally:
    batches.close()
    progress.close()
  checkpoints.wait()

  results = _test_best(config, checkpoints, state, test, eval_fn, parallel,
                       workdir_path)
  metrics_log.write({'kind': 'test', 'step': int(state.step),
                     **{k: v for k, v in results.items()
                        if isinstance(v, float)}})
  metrics_log.close()
  checkpoints.close()
  return results


def _epoch_line(record: dict[str, Any]) -> str:
  """An epoch record for people (the JSON goes to metrics.jsonl)."""
  return (f"epoch {record['epoch']:g} (step {record['step']}, "
          f"{_format_seconds(record['seconds'])}): "
          f"train loss {record['train_loss']:.4f} "
          f"accuracy {100 * record['train_accuracy']:.2f}% | "
          f"validation loss {record['validation_loss']:.4f} "
          f"accuracy {100 * record['validation_accuracy']:.2f}%")


def _test_best(config, checkpoints: Checkpoints, state, test, eval_fn,
               parallel: DataParallel, workdir: Path) -> dict[str, Any]:
  """Evaluates the best-on-validation checkpoint on the test set."""
  best_step = checkpoints.best_step()
  if best_step is not None and best_step != int(state.step):
    # Damaged: set aside, and the best of the others is used.
    state, _ = checkpoints.restore_best(state)
    state = jax.device_put(state, parallel.replicated)
  test_metrics = evaluate(eval_fn, state.params, *test, config, parallel)
  results = {
      'checkpoint_step': int(state.step),
      'validation_accuracy': checkpoints.validation_accuracy(int(state.step)),
      'test_accuracy': test_metrics['accuracy'],
      'test_error': 1.0 - test_metrics['accuracy'],
      'test_loss': test_metrics['loss'],
      'test_examples': test_metrics['count'],
  }
  if config.reconstruction_weight > 0 and config.num_reconstructions > 0:
    count = min(config.num_reconstructions, len(test[1]))
    images, labels = test[0][:count], test[1][:count]
    output = jax.jit(state.apply_fn, out_shardings=parallel.replicated)(
        {'params': state.params}, parallel.replicate(images))
    if jax.process_index() == 0:
      save_reconstructions(workdir / 'reconstructions.png', images, labels,
                           jax.device_get(output))
  if jax.process_index() == 0:
    text = checkpoints_lib.strict_json(results, indent=2)
    temporary = workdir / 'test_results.json.tmp'
    temporary.write_text(text + '\n')
    temporary.replace(workdir / 'test_results.json')
    print('test of the best checkpoint on validation: '
          + checkpoints_lib.strict_json(results), flush=True)
    print(f'results in {workdir}: test_results.json, metrics.jsonl, '
          'tensorboard/, checkpoints/', flush=True)
  return results
