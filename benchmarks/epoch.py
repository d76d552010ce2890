"""What a whole epoch of `python -m train.main` costs beyond its steps.

Runs `train.train.train_and_evaluate` for one epoch of the default config
(or `--max-steps`). The epoch is timed from the second batch (the first
step's compilation is reported apart, as a one-time cost) to the end of the
last checkpoint save, and split into:

- the training steps: (steps - 1) x the time of one bare step. Bare steps
  are the same jitted step over real training batches of the same config,
  made beforehand and dispatched as the loop dispatches them (at most
  `train.MAX_STEPS_IN_FLIGHT` unfinished, waiting for the metrics every
  `log_every_steps`), with nothing else (no
  evaluation, checkpoint or logging): as many as the epoch has, half just
  before it and half just after, and their mean per step is used, so that
  a machine whose speed drifts over minutes moves both sides of the
  comparison alike. The median of `--step-repeats` steps on one random
  batch (`benchmarks/common.benchmark_train_step`) is reported beside it;
- validation: the evaluation at the end of the epoch (its compilation
  included: it happens once a run). Its compilation is estimated as the
  validation's time less its examples at the test evaluation's rate (the
  same compiled function), and `outside_steps_fraction_compiled` is the
  fraction outside the steps without it: that of every epoch but a run's
  first;
- checkpoints: `Checkpoints.save` and the final `wait`;
- the rest: the input pipeline, progress and metrics, everything else.

`outside_steps_fraction` is 1 - steps / epoch. Evaluation throughput comes
from the test-set evaluation that follows (compiled by then), beside the
training throughput of the median step. The process's peak resident memory
(`ru_maxrss`) and the training data's size are recorded too.

Examples:

    python benchmarks/epoch.py --out epoch.json          # one full epoch
    python benchmarks/epoch.py --max-steps 3 --train-examples 64 \\
        --eval-examples 32 --batch-size 4                 # smoke test
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax

if __package__ in (None, ''):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from train import batching  # pylint: disable=g-import-not-at-top
from train import checkpoints  # pylint: disable=g-import-not-at-top
from train import host_memory  # pylint: disable=g-import-not-at-top
from train import input_pipeline  # pylint: disable=g-import-not-at-top
from train import train as train_lib  # pylint: disable=g-import-not-at-top


def parse_args(argv: Sequence[str] | None):
  parser = common.make_parser(__doc__)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--step-repeats', type=int, default=10,
                      help='timed training steps for the median step')
  parser.add_argument('--bare-steps', type=int, default=-1,
                      help='bare training steps timed around the epoch, '
                      'half before and half after (-1: as many as the '
                      'epoch has)')
  parser.add_argument('--tiny', action='store_true',
                      help='a tiny CapsNet (smoke tests): 8 conv features, '
                      '2 primary capsule types, a 16-unit decoder')
  common.add_training_budget_arguments(parser)
  common.add_allocator_argument(parser)
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.step_repeats < 1:
    parser.error('--batch-size and --step-repeats must be >= 1')
  if args.bare_steps == 0 or args.bare_steps < -1:
    parser.error('--bare-steps must be >= 1, or -1 for the epoch\'s steps')
  common.check_training_budget(parser, args, True)
  return args


class Timeline:
  """Wall-clock marks and summed durations of the loop's phases."""

  def __init__(self):
    self.calls: dict[str, list[tuple[float, float]]] = {}  # (start, seconds)
    self.evaluated: list[tuple[float, int]] = []  # (start, examples)
    self.batch_times: list[float] = []
    self.test_started: float | None = None

  def timed(self, name: str, function):
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      try:
        return function(*args, **kwargs)
      finally:
        self.calls.setdefault(name, []).append(
            (start, time.perf_counter() - start))
    return wrapper

  def seconds_between(self, name: str, start: float, end: float) -> float:
    """Summed durations of the `name` calls that started in [start, end)."""
    return sum(seconds for began, seconds in self.calls.get(name, [])
               if start <= began < end)

  def examples_between(self, start: float, end: float) -> int:
    """Examples of the evaluations that started in [start, end)."""
    return sum(examples for began, examples in self.evaluated
               if start <= began < end)


@contextlib.contextmanager
def instrumented(timeline: Timeline):
  """Wraps the loop's phases (restored afterwards)."""
  originals = (train_lib.evaluate, checkpoints.Checkpoints.save,
               checkpoints.Checkpoints.wait, input_pipeline.train_batches,
               train_lib._test_best)  # pylint: disable=protected-access

  def train_batches(*args, **kwargs):
    for batch in originals[3](*args, **kwargs):
      timeline.batch_times.append(time.perf_counter())
      yield batch

  def test_best(*args, **kwargs):
    timeline.test_started = time.perf_counter()
    return originals[4](*args, **kwargs)

  timed_evaluate = timeline.timed('evaluate', originals[0])

  def evaluate(eval_fn, variables, examples, *args, **kwargs):
    timeline.evaluated.append((time.perf_counter(), len(examples)))
    return timed_evaluate(eval_fn, variables, examples, *args, **kwargs)

  train_lib.evaluate = evaluate
  checkpoints.Checkpoints.save = timeline.timed('save', originals[1])
  checkpoints.Checkpoints.wait = timeline.timed('wait', originals[2])
  input_pipeline.train_batches = train_batches
  train_lib._test_best = test_best  # pylint: disable=protected-access
  try:
    yield
  finally:
    (train_lib.evaluate, checkpoints.Checkpoints.save,
     checkpoints.Checkpoints.wait, input_pipeline.train_batches,
     train_lib._test_best) = originals  # pylint: disable=protected-access


def make_config(args):
  config = common.make_config(batch_size=args.batch_size)
  if args.tiny:
    config.model.conv_features = 8
    config.model.primary_capsule_types = 2
    config.model.decoder_hidden_sizes = (16,)
  return config


def median_step(config, args) -> dict[str, Any]:
  state = common.state_for(common.create_state(config), config)
  batch = common.random_batch(args.batch_size)
  return common.benchmark_train_step(config, state, batch,
                                     repeats=args.step_repeats, warmup=2)


class BareSteps:
  """The training step alone, over real batches, timed in runs."""

  def __init__(self, config, num_steps: int):
    config = config.copy_and_resolve_references()
    splits = input_pipeline.load_source_splits(config)
    train, _, _ = input_pipeline.training_data(config, splits)
    train_batch = input_pipeline.DATASETS[config.dataset].train_batch
    # Made and placed beforehand: only the steps are timed.
    self.batches = [jax.device_put(train_batch(config, train, step, 0, 1))
                    for step in range(num_steps)]
    self.state = common.state_for(common.create_state(config), config)
    self.step = jax.jit(functools.partial(train_lib.train_step,
                                          config=config), donate_argnums=0)
    self.state, _ = self.step(self.state, self.batches[0])  # compiles
    jax.block_until_ready(self.state)

  def seconds_per_step(self, batches: Sequence[Any],
                       wait_every: int) -> float:
    """Dispatched as the training loop does: at most
    `train.MAX_STEPS_IN_FLIGHT` steps unfinished, and a wait for a step's
    metrics every `wait_every` steps (`config.log_every_steps`)."""
    in_flight = train_lib.StepsInFlight()
    start = time.perf_counter()
    for index, batch in enumerate(batches, 1):
      in_flight.make_room()
      self.state, metrics = self.step(self.state, batch)
      in_flight.dispatched(metrics)
      if index % wait_every == 0:
        jax.block_until_ready(metrics)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / len(batches)


def epoch_steps(config) -> int:
  """The training steps of the run `train_for_accuracy` makes."""
  steps = batching.steps_per_epoch(input_pipeline.num_train_examples(config),
                                   config.batch_size) * config.num_epochs
  return min(steps, config.max_steps) if config.max_steps > 0 else steps


def epoch_breakdown(timeline: Timeline, step: dict[str, Any],
                    steps: int,
                    bare_step_s: float | None = None) -> dict[str, Any]:
  """The epoch's phases; its steps cost `bare_step_s` each (else the
  median step's time)."""
  if steps < 2 or timeline.test_started is None:
    raise RuntimeError('the epoch needs at least 2 steps to be timed')
  start, end = timeline.batch_times[1], timeline.test_started
  epoch_s = end - start
  validation_s = timeline.seconds_between('evaluate', start, end)
  checkpoint_s = (timeline.seconds_between('save', start, end)
                  + timeline.seconds_between('wait', start, end))
  step_s = bare_step_s or step['median_s']
  steps_s = (steps - 1) * step_s
  test_s = timeline.seconds_between('evaluate', end, float('inf')) or None
  test_examples = timeline.examples_between(end, float('inf'))
  eval_images_per_s = test_examples / test_s if test_s else None
  validation_compile_s = None
  outside_compiled = None
  if eval_images_per_s:
    validation_compile_s = max(0.0, validation_s - (
        timeline.examples_between(start, end) / eval_images_per_s))
    outside_compiled = 1.0 - steps_s / (epoch_s - validation_compile_s)
  return {
      'steps': steps,
      'epoch_s': epoch_s,
      'first_batch_to_second_s': timeline.batch_times[1]
                                 - timeline.batch_times[0],
      'steps_s': steps_s,
      'validation_s': validation_s,
      'checkpoint_s': checkpoint_s,
      'rest_s': epoch_s - steps_s - validation_s - checkpoint_s,
      'outside_steps_fraction': 1.0 - steps_s / epoch_s,
      'step_s': step_s,
      'step_source': 'bare steps' if bare_step_s else 'median step',
      'outside_steps_fraction_by_median_step': 1.0 - (
          (steps - 1) * step['median_s'] / epoch_s),
      'train_images_per_s': step['images_per_s'],
      'test_evaluation_s': test_s,
      'eval_images_per_s': eval_images_per_s,
      'validation_compile_s': validation_compile_s,
      'outside_steps_fraction_compiled': outside_compiled,
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  machine = common.set_up_machine(args)
  config = make_config(args)
  print('timing the training step...', flush=True)
  step = median_step(config, args)
  print(f"median step {step['median_s']:.3f} s", flush=True)
  common.apply_training_budget(config, args)
  num_bare = epoch_steps(config) if args.bare_steps < 0 else args.bare_steps
  bare = BareSteps(config, max(num_bare, 2))
  half = len(bare.batches) // 2
  bare_before = bare.seconds_per_step(bare.batches[:half],
                                       config.log_every_steps)
  print(f'{half} bare steps before the epoch: {bare_before:.3f} s a step',
        flush=True)
  timeline = Timeline()
  with tempfile.TemporaryDirectory(prefix='capsjax_epoch_') as temporary:
    workdir = Path(args.workdir or temporary) / 'epoch'
    with instrumented(timeline):
      start = time.perf_counter()
      result = common.train_for_accuracy(config, args, workdir)
      total_s = time.perf_counter() - start
  bare_after = bare.seconds_per_step(bare.batches[half:],
                                      config.log_every_steps)
  print(f'{len(bare.batches) - half} bare steps after the epoch: '
        f'{bare_after:.3f} s a step', flush=True)
  bare_step_s = (bare_before + bare_after) / 2
  del bare
  breakdown = epoch_breakdown(timeline, step, result['checkpoint_step'],
                              bare_step_s)
  peak_rss = host_memory.peak_resident_bytes()
  report = {
      'benchmark': 'epoch',
      'settings': {'batch_size': args.batch_size, 'tiny': args.tiny,
                   'step_repeats': args.step_repeats,
                   'bare_steps': args.bare_steps,
                   'eval_batch_size': config.eval_batch_size,
                   **common.training_budget(args)},
      'train_step': step,
      'bare_steps': {'before_s': bare_before, 'after_s': bare_after,
                     'count': num_bare},
      'epoch': breakdown,
      'train_and_evaluate_s': total_s,
      'accuracy': result,
      'peak_resident_bytes': peak_rss,
      'machine': {**machine, 'loadavg_end': list(os.getloadavg())},
  }
  print(common.format_table(
      ['epoch s', f"steps s ({breakdown['step_s']:.3f} s each)",
       'validation s', 'checkpoints s', 'rest s', 'outside steps',
       'outside, validation compiled', 'train img/s', 'eval img/s',
       'peak RSS MB'],
      [[f"{breakdown['epoch_s']:.1f}", f"{breakdown['steps_s']:.1f}",
        f"{breakdown['validation_s']:.1f}",
        f"{breakdown['checkpoint_s']:.1f}", f"{breakdown['rest_s']:.1f}",
        f"{100 * breakdown['outside_steps_fraction']:.1f}%",
        (f"{100 * breakdown['outside_steps_fraction_compiled']:.1f}%"
         if breakdown['outside_steps_fraction_compiled'] is not None
         else '-'),
        f"{breakdown['train_images_per_s']:.1f}",
        f"{breakdown['eval_images_per_s']:.1f}",
        f'{peak_rss / common.MB:.0f}']]))
  if args.out:
    common.write_json(args.out, report)
  jax.clear_caches()
  return report


if __name__ == '__main__':
  main()
