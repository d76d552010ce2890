"""Speed and host memory of the training loop against its steps in flight.

JAX dispatches a jitted step and returns before it has run, so a loop can
queue steps behind the one running, whose buffers then share the heap with
the running step's. The training loop makes the next batch
while a step runs and keeps at most `train.train.MAX_STEPS_IN_FLIGHT` steps
unfinished (1: a step is dispatched once the one before it has finished).
This runs a training step (`train.train.train_step`, jitted, state donated;
the MNIST CapsNet, or `--experiment`'s model on its inputs) over `--steps`
batches for each `--limits` value (steps unfinished at most, the one being
dispatched included; waiting for the metrics every `--wait-every` steps as
the loop does), each in a fresh process, so that its peak resident memory
(`ru_maxrss`, compilation included) is its own. Every step gets a fresh
host copy of its batch, made before the wait, as the loop's batches are.
After each wait for a step the loop pauses for XLA:CPU to free the step's
temporaries (`train.host_memory.RELEASE_PAUSE_SECONDS`); `--pauses-ms`
runs each limit with each pause given (0: none). The variants alternate,
`--repeats` times, and the table gives each one's median seconds per step
and peak memory, with every run's figure beside it.

Examples:

    python benchmarks/steps_in_flight.py --out in_flight.json
    python benchmarks/steps_in_flight.py --experiment multimnist --steps 60
    python benchmarks/steps_in_flight.py --limits 1 --pauses-ms 0,5
    python benchmarks/steps_in_flight.py --small --steps 6 --limits 4,1 \\
        --repeats 1                                      # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ''):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from benchmarks import train_step  # pylint: disable=g-import-not-at-top

RESULT_PREFIX = 'steps_in_flight_result: '


def parse_args(argv: Sequence[str] | None):
  parser = common.make_parser(__doc__)
  parser.add_argument('--limits', default='3,2,1',
                      help='comma-separated steps-in-flight limits (>= 1)')
  parser.add_argument('--pauses-ms', default=None,
                      help='comma-separated pauses after each wait, in '
                      'milliseconds (default: the loop\'s, '
                      'train.host_memory.RELEASE_PAUSE_SECONDS)')
  parser.add_argument('--steps', type=int, default=150,
                      help='timed steps per run')
  parser.add_argument('--wait-every', type=int, default=50,
                      help="wait for a step's metrics every this many steps "
                      '(config.log_every_steps)')
  parser.add_argument('--repeats', type=int, default=2,
                      help='runs of each limit, alternating')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--small', action='store_true',
                      help='a tiny CapsNet (smoke tests)')
  parser.add_argument('--experiment', default='mnist',
                      choices=('mnist', *train_step.EXPERIMENTS),
                      help="the step of another experiment's model and inputs "
                      '(benchmarks/train_step.py --experiments)')
  parser.add_argument('--out', help='write the results as JSON here')
  # The run of one limit, in a process of its own.
  parser.add_argument('--child', type=int, default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--child-pause-ms', type=float, default=0.0,
                      help=argparse.SUPPRESS)
  common.add_allocator_argument(parser)
  args = parser.parse_args(argv)
  args.limits = common.parse_int_list(args.limits)
  if any(limit < 1 for limit in args.limits):
    parser.error('--limits must be >= 1 (the step being dispatched)')
  if args.pauses_ms is None:
    from train import host_memory  # pylint: disable=g-import-not-at-top
    args.pauses_ms = [host_memory.RELEASE_PAUSE_SECONDS * 1000]
  else:
    try:
      args.pauses_ms = [float(value) for value in args.pauses_ms.split(',')]
    except ValueError:
      parser.error(f'--pauses-ms must be comma-separated numbers, got '
                   f'{args.pauses_ms!r}')
    if any(pause < 0 for pause in args.pauses_ms):
      parser.error('--pauses-ms must be >= 0')
  if args.small and args.experiment != 'mnist':
    parser.error('--small is the MNIST CapsNet only')
  for name in ('steps', 'wait_every', 'repeats', 'batch_size'):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def run_limit(args) -> dict[str, Any]:
  """In this process: `args.steps` steps with at most `args.child` steps
  unfinished, pausing `args.child_pause_ms` after each wait."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from train import host_memory  # pylint: disable=g-import-not-at-top
  from train import train as train_lib  # pylint: disable=g-import-not-at-top

  if args.experiment == 'mnist':
    config = common.make_config(batch_size=args.batch_size, small=args.small)
    state = common.create_state(config)
    batch = common.random_batch(args.batch_size)
  else:
    config, _, batch, state = train_step.experiment_inputs(args.experiment,
                                                           args.batch_size)
  batch = jax.device_get(batch)  # Host arrays, as the loop's batches are.
  step = jax.jit(functools.partial(train_lib.train_step, config=config),
                 donate_argnums=0)
  state = common.state_for(state, config)
  for _ in range(2):  # Compiles, then one step warm.
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  in_flight = train_lib.StepsInFlight(
      args.child, pause_seconds=args.child_pause_ms / 1000)
  start = time.perf_counter()
  for index in range(1, args.steps + 1):
    # A fresh host batch each step, made while the last one runs.
    fresh = jax.device_put({name: np.array(value)
                            for name, value in batch.items()})
    in_flight.make_room()
    state, metrics = step(state, fresh)
    in_flight.dispatched(metrics)
    if index % args.wait_every == 0:
      jax.block_until_ready(metrics)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  return {'limit': args.child, 'pause_ms': args.child_pause_ms,
          'step_s': seconds / args.steps,
          'peak_resident_mb': host_memory.peak_resident_bytes() / 2**20}


def child_command(args, limit: int, pause_ms: float) -> list[str]:
  command = [sys.executable, os.path.abspath(__file__), '--child', str(limit),
             '--child-pause-ms', str(pause_ms),
             '--steps', str(args.steps), '--wait-every', str(args.wait_every),
             '--batch-size', str(args.batch_size),
             '--experiment', args.experiment]
  return command + ['--small'] * args.small + (
      ['--system-malloc'] * args.system_malloc)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.child is not None:
    common.set_up_machine(args)
    print(RESULT_PREFIX + json.dumps(run_limit(args)), flush=True)
    return None
  machine = common.set_up_machine(args)
  variants = [(limit, pause) for pause in args.pauses_ms
              for limit in args.limits]
  runs: dict[tuple[int, float], list[dict[str, Any]]] = {
      variant: [] for variant in variants}
  for repeat in range(args.repeats):
    for limit, pause in variants:
      output = subprocess.run(child_command(args, limit, pause),
                              capture_output=True, text=True, check=False)
      lines = [line for line in output.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
      if output.returncode != 0 or not lines:
        raise SystemExit(f'the run with limit {limit}, pause {pause} ms '
                         'failed:\n' + output.stderr[-3000:])
      result = json.loads(lines[-1][len(RESULT_PREFIX):])
      runs[limit, pause].append(result)
      print(f"run {repeat + 1}, at most {limit} in flight, pause {pause:g} "
            f"ms: {result['step_s']:.3f} s/step, peak "
            f"{result['peak_resident_mb'] / 1024:.2f} GiB", flush=True)
  rows = []
  summary = []
  for (limit, pause), results in runs.items():
    step_s = [result['step_s'] for result in results]
    peaks = [result['peak_resident_mb'] / 1024 for result in results]
    summary.append({'limit': limit, 'pause_ms': pause,
                    'median_step_s': statistics.median(step_s),
                    'median_peak_resident_gib': statistics.median(peaks),
                    'runs': results})
    rows.append([limit, f'{pause:g}', f'{statistics.median(step_s):.3f}',
                 ', '.join(f'{value:.3f}' for value in step_s),
                 f'{statistics.median(peaks):.2f}',
                 ', '.join(f'{value:.2f}' for value in peaks)])
  print(f'\n{args.experiment} training step, batch {args.batch_size}'
        f"{', small model' if args.small else ''}: {args.steps} steps a run, "
        f"a wait for the metrics every {args.wait_every}")
  print(common.format_table(
      ['steps in flight at most', 'pause after a wait, ms', 'median s/step',
       'runs s/step',
       'median peak GiB', 'runs peak GiB'], rows))
  report = {'benchmark': 'steps_in_flight', 'machine': machine,
            'settings': {'experiment': args.experiment,
                         'pauses_ms': args.pauses_ms,
                         'steps': args.steps, 'wait_every': args.wait_every,
                         'repeats': args.repeats,
                         'batch_size': args.batch_size, 'small': args.small},
            'results': summary}
  if args.out:
    common.write_json(args.out, report)
  return report


if __name__ == '__main__':
  main()
