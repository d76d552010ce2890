"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The model comes from `train/models.py`, its loss from
`train/objectives.py`, the data from `train/input_pipeline.py`; the step is
data parallel over every device of every host (`train/parallel.py`).

Resuming needs only the checkpoint: the training batch of a step is a pure
function of (seed, step), dropout's rng too, and the learning-rate schedule
reads the step from the optimizer state.
"""

from __future__ import annotations

import collections
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax.training import train_state

from train import averaging
from train import batching
from train import checkpoints as checkpoints_lib
from train import config_checks
from train import hardware
from train import host_memory
from train import input_pipeline
from train import models
from train import objectives
from train import parallel as parallel_lib
from train import reporting
from train import workdir as workdir_lib
from train.checkpoints import Checkpoints
from train.config_checks import ConfigError
from train.datasets import DataError
from train.reporting import TrainingDiverged

Metrics = reporting.Metrics

# Training steps dispatched and not yet finished. JAX dispatches a step and
# returns at once. With a step queued behind the running one, the two steps'
# buffers interleave on the heap that train/host_memory.py keeps and leave
# holes that the next step's temporaries do not fit, so the heap grows by a
# step's temporaries at a time: the MultiMNIST step (1.4 GB of temporaries)
# grew it to 6.1 GB in 30 steps with one queued, and it stayed at 2.2-3.3 GB
# with none (docs/speed.md, "Host memory"). So the loop makes the next batch
# while a step runs, and dispatches it once that step has finished and its
# temporaries have been freed (`host_memory.pause_for_released_temporaries`).
MAX_STEPS_IN_FLIGHT = 1


class StepsInFlight:
  """Keeps at most `limit` dispatched steps unfinished: `make_room()`, called
  before a dispatch, waits for the oldest ones until fewer than `limit` are
  left; `finish()` waits for all of them; `dispatched(outputs)` counts the
  new one in. After each wait it pauses `pause_seconds` (by default
  `host_memory.release_pause_seconds()`) for the step's temporaries to be
  freed."""

  def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT,
               pause_seconds: float | None = None):
    if limit < 1:
      raise ValueError(f'limit must be at least 1 (the step being '
                       f'dispatched), got {limit}')
    self._limit = limit
    self._pause_seconds = (host_memory.release_pause_seconds()
                           if pause_seconds is None else pause_seconds)
    self._outputs: collections.deque[Any] = collections.deque()

  def make_room(self) -> None:
    self._wait_until_fewer_than(self._limit)

  def finish(self) -> None:
    self._wait_until_fewer_than(1)

  def _wait_until_fewer_than(self, count: int) -> None:
    while len(self._outputs) >= count:
      jax.block_until_ready(self._outputs.popleft())
      host_memory.pause_for_released_temporaries(self._pause_seconds)

  def dispatched(self, outputs: Any) -> None:
    self._outputs.append(outputs)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * decay_rate ** (step / decay_steps), the official code's schedule."""
  return optax.exponential_decay(
      init_value=config.learning_rate,
      transition_steps=config.learning_rate_decay_steps,
      decay_rate=config.learning_rate_decay_rate,
  )


def optimizer(config: ml_collections.ConfigDict
              ) -> optax.GradientTransformation:
  """Adam on `learning_rate_schedule`; with
  `config.parameter_average_decay > 0` it also keeps the parameters'
  moving average (`train.averaging`), which evaluation then uses."""
  adam = optax.adam(learning_rate_schedule(config))
  decay = config.get('parameter_average_decay', 0.0)
  if decay > 0:
    return optax.chain(adam, averaging.parameter_average(decay))
  return adam


class TrainStateWithModelState(train_state.TrainState):
  """A train state that also carries the model's variables other than
  'params' (batch norm's 'batch_stats'), which the step replaces with the
  model's updates and the optimizer never sees.

  Only models with such collections get it, so that the checkpoints of the
  others keep the plain `TrainState` layout (and resume across versions).
  """

  model_state: Any = None


def create_train_state(config: ml_collections.ConfigDict,
                       image_shape: tuple[int, ...]) -> train_state.TrainState:
  model = models.create_model(config)
  images = jnp.zeros((1, *image_shape), jnp.float32)
  variables = dict(model.init(jax.random.key(config.seed), images,
                              jnp.zeros((1,), jnp.int32)))
  params = variables.pop('params')
  model_state = {name: variables[name]
                 for name in models.state_collections(config)}
  fields = dict(apply_fn=model.apply, params=params, tx=optimizer(config))
  if model_state:
    return TrainStateWithModelState.create(**fields, model_state=model_state)
  return train_state.TrainState.create(**fields)


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array],
               config: ml_collections.ConfigDict):
  """One Adam step on the mean loss of a (global) batch."""

  def loss_fn(params):
    output, model_state = models.apply_model(
        state.apply_fn, models.variables(state, params), batch,
        config, train=True, step=state.step)
    per_example = objectives.per_example_losses(output, batch, config)
    means = {name: jnp.mean(value) for name, value in per_example.items()}
    return means['loss'], (means, model_state)

  gradients, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  # Watched by the loop: a non-finite one stops the run before it is saved.
  metrics['gradient_norm'] = optax.tree.norm(gradients)
  if model_state:
    state = state.replace(model_state=model_state)
  return state.apply_gradients(grads=gradients), metrics


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array],
              apply_fn, config: ml_collections.ConfigDict
              ) -> dict[str, jax.Array]:
  """Sums of the per-example metrics over the real (mask = 1) rows."""
  output, _ = models.apply_model(apply_fn, variables, batch, config,
                                 train=False)
  per_example = objectives.per_example_losses(output, batch, config)
  sums = {name: jnp.sum(value * batch['mask'])
          for name, value in per_example.items()}
  sums['count'] = jnp.sum(batch['mask'])
  return sums


def eval_steps(variables: dict[str, Any], batches: dict[str, jax.Array],
               apply_fn, config: ml_collections.ConfigDict
               ) -> dict[str, jax.Array]:
  """`eval_step`'s sums over a stack of batches `(stack, batch, ...)`.

  One compiled loop over the stack: XLA computes what depends only on the
  variables (the Fourier method's kernel spectra) once for the whole stack
  instead of once a batch.
  """
  sums = jax.lax.map(
      lambda batch: eval_step(variables, batch, apply_fn, config), batches)
  return jax.tree.map(lambda value: jnp.sum(value, axis=0), sums)


def evaluate(eval_fn, variables, examples,
             config: ml_collections.ConfigDict,
             parallel: parallel_lib.DataParallel) -> Metrics:
  """Mean metrics over every example (the last partial batch included);
  `eval_fn` is the jitted `eval_steps`."""
  per_call = batching.stack_size(len(examples), config.eval_batch_size,
                                 config.eval_batches_per_call)
  totals: dict[str, float] = {}
  for stack in batching.stacked_batches(
      examples.batches(config.eval_batch_size, jax.process_index(),
                       jax.process_count()), per_call):
    sums = jax.device_get(eval_fn(variables,
                                  parallel.global_stacked_batch(stack)))
    host_memory.pause_for_released_temporaries()
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  count = totals.pop('count')
  metrics = {name: value / count for name, value in totals.items()}
  metrics['count'] = int(count)
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains, keeps the best checkpoint on validation, tests it (without a
  validation split, `config.validation_size=0`, the last checkpoint).

  Everything about the config and the workdir is checked before anything is
  written or compiled; a rerun in the same workdir resumes the run.

  Args:
    config: the run's config (`train/configs/default.py`).
    workdir: the run's folder; a rerun must keep the config of the run in it
      except for `workdir.CHANGEABLE_FIELDS`, unless `allow_config_change`.
    allow_config_change: resume the run in `workdir` with this config even
      where it changes the model, data or optimisation, as long as the
      train state keeps its arrays (else ConfigError: the checkpoints
      could not restore into it).

  Returns:
    The final test metrics of the tested checkpoint and where it came from
    (also written to `workdir/test_results.json`).

  Raises:
    ConfigError: an impossible setting, or an unusable workdir or data.
    TrainingDiverged: a non-finite loss or gradient norm.
    checkpoints.CheckpointError: a checkpoint could not be saved.
  """
  parallel_lib.maybe_initialize_distributed(config)
  config_checks.validate_config(config, jax.device_count(),
                                jax.process_count())
  warning = hardware.precision_warning(config)
  if warning and jax.process_index() == 0:
    print(warning, flush=True)
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


def _load_data(config: ml_collections.ConfigDict):
  """(train arrays, validation set, test set); process 0 prepares the tfds
  files once, the others then read them."""
  try:
    if jax.process_index() == 0:
      splits = input_pipeline.load_source_splits(config)
    parallel_lib.wait_for_all_processes('dataset prepared')
    if jax.process_index() != 0:
      splits = input_pipeline.load_source_splits(config)
    # Together to the first device collective (which can wait only 30 s).
    parallel_lib.wait_for_all_processes('dataset loaded')
  except DataError as error:
    field = 'data_dir' if config.data_dir else 'dataset'
    raise ConfigError(
        f'config.{field}={config[field]!r}: {error}') from error
  return input_pipeline.training_data(config, splits)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir_path: Path,
                        config_changes: dict[str, Any]) -> dict[str, Any]:
  train_data, validation, test = _load_data(config)
  steps_per_epoch = batching.steps_per_epoch(len(train_data[1]),
                                             config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = (config.max_steps if config.num_epochs < 1 else
                   min(total_steps, config.max_steps))

  parallel = parallel_lib.DataParallel()
  state = jax.jit(functools.partial(create_train_state, config,
                                    input_pipeline.image_shape(config)),
                  out_shardings=parallel.replicated)()
  checkpoints = Checkpoints(workdir_path, config.keep_checkpoints)
  difference = checkpoints.layout_difference(state)
  if difference is not None:  # Only with --allow_config_change.
    checkpoints.close()
    raise ConfigError(
        f'--workdir={workdir_path} holds checkpoints of another train state '
        f'than this config builds ({difference}): they cannot resume with '
        'it; use a new --workdir')
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir_path, config)  # read by train.trained
  progress_record: dict[str, Any] = {}
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state, progress_record = restored
    state = jax.device_put(state, parallel.replicated)
    logging.info('Resumed from step %d.', int(state.step))
    if jax.process_index() == 0:
      print(f'resumed from the checkpoint at step {int(state.step)}',
            flush=True)

  target = config.get('stop_at_validation_accuracy', 0.0)
  best_step = checkpoints.best_step() if target else None
  if (best_step is not None and
      checkpoints.validation_accuracy(best_step) >= target):
    # Reached in an earlier run: a resumed run trains no further.
    total_steps = int(state.step)
    if jax.process_index() == 0:
      print(f'validation accuracy reached {target:.2%} at step {best_step} '
            '(config.stop_at_validation_accuracy): no more training',
            flush=True)

  step_fn = jax.jit(functools.partial(train_step, config=config),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_steps, apply_fn=state.apply_fn,
                                      config=config))
  first_step = int(state.step)
  metrics_log = reporting.MetricsLog(workdir_path, resumed_step=first_step)
  if config_changes:
    metrics_log.write({'kind': 'config_change', 'step': first_step,
                       'changes': config_changes})
  if jax.process_index() == 0:
    print(f'{models.model_name(config)} on {config.dataset}, '
          f'{total_steps} steps ({steps_per_epoch} an epoch), batch '
          f'{config.batch_size}, {config.precision}, {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s), workdir {workdir_path}',
          flush=True)
  progress = reporting.Progress(first_step, total_steps)
  epoch = reporting.EpochMetrics(progress_record.get('epoch'))
  train_seconds = progress_record.get('train_seconds', 0.0)
  run_start = time.monotonic()
  batches = input_pipeline.train_batches(
      config, train_data, start_step=first_step,
      num_steps=max(total_steps - first_step, 0),
      process_index=jax.process_index(), process_count=jax.process_count())
  in_flight = StepsInFlight()
  try:
    for step in range(first_step + 1, total_steps + 1):
      batch = parallel.global_batch(next(batches))
      in_flight.make_room()
      state, metrics = step_fn(state, batch)
      in_flight.dispatched(metrics)
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
        in_flight.finish()  # Evaluation's temporaries then have the heap.
        validation_metrics = (
            evaluate(eval_fn, models.variables(state), validation, config,
                     parallel) if len(validation) else {})
        validation_accuracy = validation_metrics.get('accuracy')
        record = {
            'kind': 'epoch', 'step': step,
            'epoch': step / steps_per_epoch,
            'seconds': epoch.seconds(),
            **{f'train_{k}': v for k, v in epoch.means().items()},
            **{f'validation_{k}': v for k, v in validation_metrics.items()
               if k != 'count'},
        }
        peak_bytes = host_memory.peak_resident_bytes()
        if peak_bytes is not None:  # This process's, since it started.
          record['peak_resident_mb'] = round(peak_bytes / 2**20)
        metrics_log.write(record)
        progress.update(step, force=True)
        if jax.process_index() == 0:
          print('\n' + reporting.epoch_line(record), flush=True)
        if end_of_epoch:  # A run's last, partial epoch goes on if resumed.
          epoch = reporting.EpochMetrics()
      checkpoints.save(step, state, {
          'epoch': epoch.state(),
          'train_seconds': train_seconds + time.monotonic() - run_start,
      }, validation_accuracy)
      if target and validation_accuracy is not None and (
          validation_accuracy >= target):
        if jax.process_index() == 0:
          print(f'validation accuracy {validation_accuracy:.2%} reached '
                f'{target:.2%} (config.stop_at_validation_accuracy): '
                f'training stops at step {step}', flush=True)
        break
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


def _test_best(config, checkpoints: Checkpoints, state, test, eval_fn,
               parallel: parallel_lib.DataParallel,
               workdir: Path) -> dict[str, Any]:
  """Evaluates the best-on-validation checkpoint on the test set (the
  last one when there is no validation split)."""
  best_step = checkpoints.best_step()
  if best_step is not None and best_step != int(state.step):
    # Damaged: set aside, and the best of the others is used.
    state, _ = checkpoints.restore_best(state)
    state = jax.device_put(state, parallel.replicated)
  test_metrics = evaluate(eval_fn, models.variables(state), test, config,
                          parallel)
  results = {
      'checkpoint_step': int(state.step),
      'validation_accuracy': checkpoints.validation_accuracy(int(state.step)),
      'test_accuracy': test_metrics['accuracy'],
      'test_error': 1.0 - test_metrics['accuracy'],
      'test_loss': test_metrics['loss'],
      'test_examples': test_metrics['count'],
  }
  if config.reconstruction_weight > 0 and config.num_reconstructions > 0:
    examples = test.first(min(config.num_reconstructions, len(test)))
    output = jax.jit(state.apply_fn, out_shardings=parallel.replicated)(
        models.variables(state), parallel.replicate(examples['image']))
    if jax.process_index() == 0:
      output = jax.device_get(output)
      reporting.save_reconstructions_png(
          workdir / 'reconstructions.png', examples['image'],
          examples['label'], output.lengths.argmax(-1),
          output.reconstructions)
  if jax.process_index() == 0:
    text = checkpoints_lib.strict_json(results, indent=2)
    temporary = workdir / 'test_results.json.tmp'
    temporary.write_text(text + '\n')
    temporary.replace(workdir / 'test_results.json')
    chosen = ('the best checkpoint on validation' if best_step is not None
              else 'the last checkpoint (no validation split)')
    print(f'test of {chosen}: ' + checkpoints_lib.strict_json(results),
          flush=True)
    print(f'results in {workdir}: test_results.json, metrics.jsonl, '
          'tensorboard/, checkpoints/', flush=True)
  return results
