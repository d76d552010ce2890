"""Speed of the full CapsNet training step, per precision, against PyTorch.

Times `train.train.train_step` (the paper's CapsNet with decoder, margin +
reconstruction loss, Adam) as `train_and_evaluate` runs it (jitted, state
donated), for each `--precision` (config.precision: float32, bfloat16),
at `--batch-size` (128): the median of `--steps` timed steps after
`--warmup` untimed ones, images/s, compile time and peak memory. A step
short enough that those would last less than `--min-warmup-seconds` (1)
and `--min-timed-seconds` (2) is warmed up and timed that long instead
(LeNet-5's step of about 10 ms: a few hundred steps); the tables give the
number of steps timed.

Every timed step's minor page faults are recorded too (`page_faults_per_step`,
and the median in the tables): a step that faults in fresh memory every time
pays for each page, see train/host_memory.py.

Fraction of the matmul peak: the step's model FLOPs (the analytic count of
the direct method in benchmarks/common.py, 154 GFLOP at batch 128) over its
median time, divided by the FLOP rate of a plain square `jnp.dot` of the
same FLOP count and dtype timed in the same run (bfloat16: bfloat16 inputs,
float32 accumulation and output, as the model's convolutions). The Fourier
convolution (config.model.conv_method 'auto' on CPU) executes fewer FLOPs
than that, so this fraction is an effective one and may exceed 100%; the
JSON also records `flops_executed`, XLA's `cost_analysis()` count (which
counts a loop body once, so it leaves out routing iterations after the
first).

Memory traffic beside it: XLA's count of the bytes the step's operations
access (`bytes_accessed`: each operation's operands and output, once; see
benchmarks/op_profile.py), the rate at which the same run streams float32
arrays of 256 MB through memory (`stream`: `y = 2 x`, reading one array
and writing another), and the time that traffic alone would take at that
rate, as a fraction of the step (`bytes_at_stream_rate_fraction`). Near
100%, the step is as fast as its memory traffic allows without moving
fewer bytes; the matmul fraction says the same of its arithmetic.

`--torch` then runs benchmarks/torch_reference.py with the same batch size,
steps, warm-up and thread count, and prints the speed ratio per precision.
Its interpreter: `--torch-python`, else the environment variable
CAPSJAX_TORCH_PYTHON, else this one (`pip install -e '.[torch]'`).

bfloat16 on a CPU without bfloat16 instructions (neither avx512_bf16 nor
amx_bf16 in /proc/cpuinfo) is not timed: XLA and PyTorch emulate it in
float32 there, and the figure would only measure the emulation. The report
says so (`skipped`); `--emulated-bfloat16` times it anyway.

Every report records the CPU model and flags and the JAX device, so the same
command runs unchanged on a GPU.

`--breakdown` times the parts of the step, each jitted and timed on its own
(so XLA cannot fuse across them or overlap them; their sum is not the step
time): conv1, PrimaryCaps, prediction vectors, routing, decoder and losses
(forward, and forward + backward of a fixed random projection of their
output), the Adam update, and the host input pipeline
(`train.batching.train_batch` on arrays the size of MNIST's training
split).

`--experiments multimnist,affnist,baseline_cnn,lenet5` also times the
other experiments' training steps (train/configs/; random inputs of their
shapes: MultiMNIST 36x36 with two labels, affNIST 40x40) in float32, and
compares each with what the MNIST step predicts from XLA's executed FLOP
counts: predicted = MNIST step time x (the experiment's executed FLOPs /
the MNIST step's), per batch of the same size; `slowdown` = measured /
predicted (above 1: slower per FLOP than the MNIST step).

`--evaluation` also times evaluation against training, in rounds that
alternate the two in one process (so that a drift of the machine's speed
moves both alike): each round times one call of `train.eval_steps` as
`train_and_evaluate` runs it (jitted, a stack of
config.eval_batches_per_call batches of `--batch-size`, every example
real) and then enough training steps to last about as long (the round's
first gives the count), and gives evaluation's images/s over training's;
the report holds the median of `--evaluation-rounds` (7) rounds' ratios.
Forward only, an evaluated image costs about a third of a trained one's
FLOPs.

`--compiler-option NAME=VALUE` (repeatable) compares XLA compiler
options on the training step, per precision: the step compiled with XLA's
defaults and once with each option (for that program only, e.g.
`--compiler-option xla_cpu_experimental_ynn_fusion_type=` for XLA:CPU
without its YNNPACK products), all in one process and timed alternately,
`--compiler-option-rounds` (7) rounds of 3 steps each, so that a drift of
the machine's speed moves every variant alike (`XLA_FLAGS`, read once a
process, can only compare across processes). The report gives each
variant's median step and the median over rounds of its time over the
defaults'. An option XLA does not accept is refused before any timing.

`--profile DIR` writes a jax.profiler trace of a few steps per precision,
and of each of `--experiments` (float32), one folder each (open with
TensorBoard's profile plugin or Perfetto) and prints the time per
XLA operation from it (benchmarks/op_profile.py): by kind (matrix products,
copies and transposes, the rest), by model part and pass, and the largest
operations, each with its bytes accessed and the rate it moves them at;
the JSON holds the whole table under 'profile'.

Examples:

    python benchmarks/train_step.py --out train_step.json
    python benchmarks/train_step.py --torch --out train_step.json
    python benchmarks/train_step.py --precision float32 --breakdown
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ''):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import capsjax  # pylint: disable=g-import-not-at-top
from benchmarks import common  # pylint: disable=g-import-not-at-top
from benchmarks import op_profile  # pylint: disable=g-import-not-at-top
from capsjax import routing  # pylint: disable=g-import-not-at-top
from train import batching  # pylint: disable=g-import-not-at-top
from train import input_pipeline  # pylint: disable=g-import-not-at-top
from train import models  # pylint: disable=g-import-not-at-top
from train import objectives  # pylint: disable=g-import-not-at-top
from train import train as train_lib  # pylint: disable=g-import-not-at-top

TORCH_SCRIPT = Path(__file__).resolve().parent / 'torch_reference.py'
TORCH_PYTHON_VARIABLE = 'CAPSJAX_TORCH_PYTHON'
# --experiments: name -> (config module in train/configs, labels per image).
EXPERIMENTS = {'multimnist': ('multimnist', 2), 'affnist': ('affnist', 1),
               'baseline_cnn': ('baseline_cnn', 1), 'lenet5': ('lenet5', 1)}
MNIST_TRAIN_EXAMPLES = 55000  # 60,000 minus the 5,000 validation examples


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = common.make_parser(__doc__)
  parser.add_argument('--precision', default='float32,bfloat16',
                      help='config.precision values, comma-separated')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps (and timed matmuls) per precision')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after compilation')
  parser.add_argument('--min-warmup-seconds', type=float, default=1.0,
                      help='warm up for at least this long')
  parser.add_argument('--min-timed-seconds', type=float, default=2.0,
                      help='time steps for at least this long in all')
  parser.add_argument('--routing-iterations', type=int, default=3)
  parser.add_argument('--stop-gradient', action='store_true',
                      help='stop_gradient_intermediate=True')
  parser.add_argument('--small', action='store_true',
                      help='a tiny CapsNet (smoke tests; not comparable '
                      'with --torch)')
  parser.add_argument('--torch', action='store_true',
                      help='also run benchmarks/torch_reference.py')
  parser.add_argument(
      '--torch-python',
      default=os.environ.get(TORCH_PYTHON_VARIABLE) or sys.executable,
      help=f'the Python with torch installed (default: ${TORCH_PYTHON_VARIABLE}'
      ', else this interpreter)')
  parser.add_argument('--emulated-bfloat16', action='store_true',
                      help='time bfloat16 on a CPU without bfloat16 '
                      'instructions too')
  parser.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                      help="PyTorch's thread count (JAX uses every core)")
  parser.add_argument('--breakdown', action='store_true',
                      help='also time the parts of the step separately')
  parser.add_argument('--experiments', default='',
                      help='comma-separated: ' + ', '.join(EXPERIMENTS))
  parser.add_argument('--evaluation', action='store_true',
                      help='also time evaluation against training, '
                      'alternating in one process')
  parser.add_argument('--evaluation-rounds', type=int, default=7)
  parser.add_argument('--compiler-option', action='append', default=[],
                      metavar='NAME=VALUE',
                      help='also time the step compiled with this XLA option '
                      'against the defaults (repeatable)')
  parser.add_argument('--compiler-option-rounds', type=int, default=7)
  parser.add_argument('--profile', metavar='DIR',
                      help='write a jax.profiler trace here')
  parser.add_argument('--profile-steps', type=int, default=3)
  parser.add_argument('--out', help='write the results as JSON here')
  common.add_allocator_argument(parser)
  common.add_conv_method_argument(parser)
  args = parser.parse_args(argv)
  args.precision = [p.strip() for p in args.precision.split(',') if p.strip()]
  args.experiments = [e.strip() for e in args.experiments.split(',')
                      if e.strip()]
  if any(name not in EXPERIMENTS for name in args.experiments):
    parser.error(f'--experiments must be from {tuple(EXPERIMENTS)}')
  unknown = [p for p in args.precision if p not in models.PRECISIONS]
  if unknown or not args.precision:
    parser.error(f'--precision must be from {tuple(models.PRECISIONS)}')
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
    parser.error('--steps and --batch-size must be >= 1, --warmup >= 0')
  if args.routing_iterations < 1:
    parser.error('--routing-iterations must be >= 1')
  if args.evaluation_rounds < 1:
    parser.error('--evaluation-rounds must be >= 1')
  if args.compiler_option_rounds < 1:
    parser.error('--compiler-option-rounds must be >= 1')
  options = []
  for text in args.compiler_option:
    name, equals, value = text.partition('=')
    if not equals or not name.strip():
      parser.error(f'--compiler-option {text!r} must be NAME=VALUE (an '
                   'empty VALUE is allowed)')
    options.append((name.strip(), value))
  args.compiler_option = options
  if args.torch and args.small:
    parser.error('--torch times the paper-size model only: drop --small')
  if args.torch and (args.routing_iterations != 3 or args.stop_gradient):
    parser.error('--torch times 3 routing iterations with the full gradient')
  return args


# ---------------------------------------------------------------------------
# The step and the matmul peak.


def matmul_peak(flops: float, precision: str, repeats: int,
                warmup: int) -> dict[str, Any]:
  """Times a square jnp.dot with (about) `flops` FLOPs in `precision`."""
  size = max(1, round((flops / 2) ** (1 / 3)))
  dtype = models.PRECISIONS[precision]
  a = common.random_normal((size, size), seed=0, dtype=dtype)
  b = common.random_normal((size, size), seed=1, dtype=dtype)
  result = common.benchmark(
      functools.partial(jnp.dot, preferred_element_type=jnp.float32), (a, b),
      repeats=repeats, warmup=max(warmup, 1))
  result.update(size=size, dtype=precision, flops=2.0 * size**3)
  result['flops_per_s'] = result['flops'] / result['median_s']
  return result


# The streaming rate's arrays: well beyond any CPU's caches, about the size
# of the step's larger temporaries.
STREAM_BYTES = 256 * 2**20


def streaming_rate(repeats: int, warmup: int,
                   array_bytes: int = STREAM_BYTES) -> dict[str, Any]:
  """Times `y = 2 x` for float32 arrays of `array_bytes`, written into a
  second array that is donated (each call's output the next one's input,
  its input the next one's destination): like the step's operations, it
  reads one buffer and writes another, already mapped, so no call faults
  in fresh memory. The same run's rate at which memory streams, in XLA's
  own count of the bytes accessed (input and output: twice `array_bytes`),
  to set the step's bytes accessed against."""
  source = jnp.ones((array_bytes // 4,), jnp.float32)
  destination = jnp.ones((array_bytes // 4,), jnp.float32)
  result = common.benchmark(
      lambda source, destination: jax.lax.dynamic_update_slice(
          destination, source * 2, (0,)),
      (source, destination), repeats=repeats, warmup=max(warmup, 1),
      donate_argnums=(1,),
      next_args=lambda args, outputs: (outputs, args[0]))
  result.update(array_bytes=array_bytes,
                bytes=result['bytes_accessed'] or 2 * array_bytes)
  result['bytes_per_s'] = result['bytes'] / result['median_s']
  return result


def step_durations(args: argparse.Namespace) -> dict[str, Any]:
  """`common.benchmark_train_step`'s step counts and durations."""
  return {'repeats': args.steps, 'warmup': args.warmup,
          'min_warmup_s': args.min_warmup_seconds,
          'min_timed_s': args.min_timed_seconds}


def time_step(config, base_state, batch, args) -> dict[str, Any]:
  step = common.benchmark_train_step(
      config, common.state_for(base_state, config), batch,
      **step_durations(args))
  # Model FLOPs: what the direct method computes. The Fourier convolution
  # executes fewer (XLA's count of them is kept as flops_executed).
  flops = common.capsnet_step_flops(config, args.batch_size)
  source = 'analytic'
  matmul = matmul_peak(flops, config.precision, args.steps, args.warmup)
  achieved = flops / step['median_s']
  executed = step['flops'] and step['flops'] / step['median_s']
  stream = streaming_rate(args.steps, args.warmup)
  # The time the step's memory traffic alone takes at the streaming rate.
  bytes_time = step['bytes_accessed'] and (step['bytes_accessed'] /
                                           stream['bytes_per_s'])
  return {
      'median_step_s': step['median_s'],
      'steps_timed': step['repeats'],
      'min_step_s': step['min_s'],
      'max_step_s': step['max_s'],
      'iqr_step_s': step['iqr_s'],
      'mean_step_s': step['mean_s'],
      'step_times_s': step['times_s'],
      'page_faults_per_step': step['page_faults'],
      'median_page_faults': step['median_page_faults'],
      'images_per_s': step['images_per_s'],
      'compile_s': step['compile_s'],
      'memory': step['memory'],
      'flops_per_step': flops,
      'flops_source': source,
      'flops_executed': step['flops'],  # XLA's cost_analysis, or None
      'flops_per_s': achieved,
      'matmul': matmul,
      'fraction_of_matmul_peak': achieved / matmul['flops_per_s'],
      'executed_flops_per_s': executed,
      'executed_fraction_of_matmul_peak': (
          executed and executed / matmul['flops_per_s']),
      'bytes_accessed': step['bytes_accessed'],  # XLA's, or None
      'stream': stream,
      'bytes_at_stream_rate_s': bytes_time,
      'bytes_at_stream_rate_fraction': (
          bytes_time and bytes_time / step['median_s']),
  }


def check_compiler_options(options: Sequence[tuple[str, str]]) -> None:
  """Exits naming the first option XLA refuses (compiled on a one-op
  program, before any timing)."""
  for name, value in options:
    try:
      jax.jit(lambda x: x + 1).lower(1.0).compile(
          compiler_options={name: value})
    except Exception as error:  # pylint: disable=broad-except
      raise SystemExit(f'--compiler-option {name}={value}: XLA refused it: '
                       f'{error}') from error


def time_compiler_options(config, base_state, batch,
                          options: Sequence[tuple[str, str]], rounds: int,
                          steps_per_round: int = 3) -> dict[str, Any]:
  """The step with XLA's defaults and with each of `options`, alternating
  in one process (see the module docstring)."""
  variants = [('XLA defaults', None)] + [
      (f'{name}={value}', {name: value}) for name, value in options]
  compiled = []
  for label, compiler_options in variants:
    state = common.state_for(base_state, config)
    step, compile_s = common.compile_train_step(config, state, batch,
                                                compiler_options)
    compiled.append({'label': label, 'options': compiler_options or {},
                     'step': step, 'state': state, 'compile_s': compile_s,
                     'step_s': []})

  for variant in compiled:
    def train_once(variant=variant):
      variant['state'], metrics = variant['step'](variant['state'], batch)
      return metrics
    variant['call'] = train_once
    jax.block_until_ready(train_once())  # warm up
  for _ in range(rounds):
    for variant in compiled:
      variant['step_s'].append(
          common.time_calls(variant['call'], steps_per_round, 0)['median_s'])
  defaults = compiled[0]['step_s']
  return {
      'rounds': rounds,
      'steps_per_round': steps_per_round,
      'variants': [{
          'options': variant['options'],
          'label': variant['label'],
          'compile_s': variant['compile_s'],
          'step_s': variant['step_s'],
          'median_step_s': statistics.median(variant['step_s']),
          'median_ratio_to_defaults': statistics.median(
              [time / default
               for time, default in zip(variant['step_s'], defaults)]),
      } for variant in compiled],
  }


def evaluation_batches(config, batch_size: int) -> dict[str, jax.Array]:
  """A stack `(eval_batches_per_call, batch_size, ...)` of random batches,
  every example real (mask 1), as `train.evaluate` hands `eval_steps`."""
  batches = [common.random_batch(batch_size, seed=index)
             for index in range(config.eval_batches_per_call)]
  stack = {name: jnp.stack([batch[name] for batch in batches])
           for name in batches[0]}
  stack['mask'] = jnp.ones(stack['label'].shape, jnp.float32)
  return stack


def time_evaluation(config, base_state, batch, rounds: int
                    ) -> dict[str, Any]:
  """Evaluation's images/s against training's, alternating in one process
  (see the module docstring)."""
  state = common.state_for(base_state, config)
  step, _ = common.compile_train_step(config, state, batch)
  variables = models.variables(base_state)
  stack = evaluation_batches(config, config.batch_size)
  evaluate, compile_s = common.compile_jitted(
      jax.jit(functools.partial(train_lib.eval_steps,
                                apply_fn=state.apply_fn, config=config)),
      variables, stack)
  current = {'state': state}

  def train_once():
    current['state'], metrics = step(current['state'], batch)
    return metrics

  jax.block_until_ready(evaluate(variables, stack))  # warm up
  jax.block_until_ready(train_once())
  eval_images = config.eval_batches_per_call * config.batch_size
  steps_per_round = None
  eval_s, train_s, ratios = [], [], []
  for _ in range(rounds):
    timing = common.time_calls(lambda: evaluate(variables, stack), 1, 0)
    eval_s.append(timing['median_s'])
    if steps_per_round is None:
      one_step = common.time_calls(train_once, 1, 0)['median_s']
      steps_per_round = max(1, round(eval_s[0] / one_step))
    timing = common.time_calls(train_once, steps_per_round, 0)
    train_s.append(timing['median_s'])
    ratios.append((eval_images / eval_s[-1])
                  / (config.batch_size / train_s[-1]))
  return {
      'rounds': rounds,
      'eval_batches_per_call': config.eval_batches_per_call,
      'images_per_call': eval_images,
      'steps_per_round': steps_per_round,
      'eval_call_s': eval_s,
      'train_step_s': train_s,
      'eval_compile_s': compile_s,
      'eval_images_per_s': eval_images / statistics.median(eval_s),
      'train_images_per_s': config.batch_size / statistics.median(train_s),
      'ratios': ratios,
      'median_ratio': statistics.median(ratios),
  }


def experiment_config(name: str, batch_size: int):
  """(config, image shape) of one of EXPERIMENTS."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'train.configs.{EXPERIMENTS[name][0]}')
  config = module.get_config()
  config.batch_size = batch_size
  return config, input_pipeline.image_shape(config)


def experiment_inputs(name: str, batch_size: int):
  """(config, image shape, a random batch of its shapes, initial state) of
  one of EXPERIMENTS."""
  config, image_shape = experiment_config(name, batch_size)
  batch = common.random_batch(batch_size, image_shape)
  labels_per_image = EXPERIMENTS[name][1]
  if labels_per_image > 1:  # MultiMNIST: two distinct classes and the two
    first = np.asarray(batch['label'])  # digits to reconstruct.
    batch['label'] = jnp.asarray(np.stack(
        [first, (first + 1 + first % 9) % 10], axis=1), jnp.int32)
    batch['digits'] = jnp.stack([batch['image'], batch['image']], axis=1)
  return config, image_shape, batch, common.create_state(config, image_shape)


def time_experiment(name: str, args, mnist: dict[str, Any]
                    ) -> dict[str, Any]:
  """One experiment's float32 step, against the MNIST step's prediction."""
  config, image_shape, batch, state = experiment_inputs(name, args.batch_size)
  step = common.benchmark_train_step(
      config, common.state_for(state, config), batch,
      **step_durations(args))
  result = {
      'config': f'train/configs/{EXPERIMENTS[name][0]}.py',
      'image_shape': list(image_shape),
      'median_step_s': step['median_s'], 'iqr_step_s': step['iqr_s'],
      'steps_timed': step['repeats'],
      'step_times_s': step['times_s'], 'images_per_s': step['images_per_s'],
      'page_faults_per_step': step['page_faults'],
      'median_page_faults': step['median_page_faults'],
      'compile_s': step['compile_s'], 'memory': step['memory'],
      'flops_executed': step['flops']}
  if step['flops'] and mnist.get('flops_executed'):
    predicted = mnist['median_step_s'] * step['flops'] / mnist[
        'flops_executed']
    result.update(predicted_step_s=predicted,
                  slowdown=step['median_s'] / predicted)
  return result


def _traffic(rows) -> tuple[str, str]:
  """(GB accessed per step, GB/s over their time) of op_table rows."""
  rows = list(rows)
  rate = op_profile.memory_rate(rows)
  return (f'{sum(map(op_profile.bytes_per_step, rows)) / 1e9:.2f}',
          '-' if rate is None else f'{rate / 1e9:.1f}')


def profile(directory: str, runs: dict[str, tuple[Any, Any, Any]],
            steps: int) -> dict[str, Any]:
  """A jax.profiler trace of `steps` steps (after warm-up) of each of
  `runs` ({label: (config, initial state, batch)}: the MNIST step per
  precision, the other experiments by name), and each one's time per XLA
  operation from it (`op_profile`), printed and returned by label."""
  tables = {}
  # One at a time, so that only one step's state and buffers are held.
  for label, (config, base_state, batch) in runs.items():
    state = common.state_for(base_state, config)
    executable, _ = common.compile_train_step(config, state, batch)
    state, metrics = executable(state, batch)  # warm up
    jax.block_until_ready(metrics)
    trace_directory = Path(directory) / label
    with jax.profiler.trace(str(trace_directory), create_perfetto_trace=True):
      for index in range(steps):
        with jax.profiler.TraceAnnotation(f'{label} step {index}'):
          state, metrics = executable(state, batch)
          jax.block_until_ready(metrics)
    rows = op_profile.op_table(op_profile.trace_events(trace_directory),
                               executable.as_text(), steps)
    tables[label] = rows
    print(f'\n{label} step, time per XLA operation from the trace '
          f'({steps} steps; the profiler adds its own overhead):')
    print(common.format_table(
        ['kind', 'ms per step', 'GB accessed', 'GB/s'],
        [(kind, f'{ms:.1f}', *_traffic(row for row in rows
                                       if row['kind'] == kind))
         for (kind,), ms in op_profile.totals_by(rows, 'kind')]))
    print(common.format_table(
        ['model part', 'pass', 'ms per step', 'GB accessed', 'GB/s'],
        [(part, direction, f'{ms:.1f}',
          *_traffic(row for row in rows if row['part'] == part and
                    row['direction'] == direction))
         for (part, direction), ms in
         op_profile.totals_by(rows, 'part', 'direction')]))
    print(common.format_table(
        ['operation', 'kind', 'ms per step', 'MB accessed', 'GB/s', 'shape',
         'op_name'],
        [(row['operation'], row['kind'], f"{row['ms_per_step']:.1f}",
          f'{op_profile.bytes_per_step(row) / 1e6:.0f}',
          *_traffic([row])[1:], row['shape'], row['op_name'][-70:])
         for row in rows[:15]]))
  print(f'wrote a profiler trace to {directory}')
  return tables


# ---------------------------------------------------------------------------
# Breakdown.


def breakdown(config, base_state, batch, repeats: int, warmup: int
              ) -> dict[str, Any]:
  """Times each part of the step on its own; see the module docstring."""
  model = common.create_model(config)
  dtype = model.dtype
  params = base_state.params
  images, labels = batch['image'], batch['label']
  conv1 = capsjax.Conv2D(model.conv_features, model.kernel_size, dtype=dtype,
                         method=model.conv_method)
  primary = capsjax.PrimaryCapsules(
      model.primary_capsule_types, model.primary_capsule_dim,
      model.kernel_size, stride=2, output_scale=model.primary_capsule_scale,
      dtype=dtype, conv_method=model.conv_method)
  decoder = capsjax.MaskedDecoder(images.shape[1:],
                                  tuple(model.decoder_hidden_sizes),
                                  dtype=dtype)

  def conv1_fn(conv1_params, images):
    return jax.nn.relu(conv1.apply({'params': conv1_params}, images))

  def primary_fn(primary_params, features):
    return primary.apply({'params': primary_params}, features)

  def prediction_fn(weights, capsules):
    return routing.prediction_vectors(capsules.astype(dtype),
                                      weights.astype(dtype))

  def routing_fn(u_hat):
    return routing.dynamic_routing(
        u_hat, model.routing_iterations,
        stop_gradient_intermediate=model.stop_gradient_intermediate)

  def decoder_fn(decoder_params, capsules):
    return decoder.apply({'params': decoder_params}, capsules, labels)

  def losses_fn(capsules, reconstructions):
    output = capsjax.CapsNetOutput(capsules, capsjax.capsule_lengths(capsules),
                                   reconstructions)
    return jnp.mean(objectives.per_example_losses(
        output, {'image': images, 'label': labels}, config)['loss'])

  kwargs = dict(repeats=repeats, warmup=warmup)
  results: dict[str, Any] = {}
  cotangent_seeds = iter(range(100, 200))

  def time_part(name, fn, fn_args, argnums):
    """Times fn's forward, and forward + backward of a fixed random
    projection of its output w.r.t. `argnums`; returns the output."""
    print(f'  {name}...', flush=True)
    forward, output = common.benchmark(fn, fn_args, return_outputs=True,
                                       **kwargs)
    scalar_fn = fn
    if output.ndim:
      cotangent = common.random_normal(output.shape, next(cotangent_seeds))
      scalar_fn = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
    results[name] = {
        'forward': forward,
        'forward_backward': common.benchmark(
            jax.value_and_grad(scalar_fn, argnums=argnums), fn_args,
            **kwargs),
    }
    return output

  # Each part runs on the previous part's output, as in the model. conv1's
  # input (the images) needs no gradient in training; every other part's
  # input does.
  features = time_part('conv1 (+ReLU)', conv1_fn,
                       (params['conv1'], images), (0,))
  capsules = time_part('PrimaryCaps conv (+squash)', primary_fn,
                       (params['primary_capsules'], features), (0, 1))
  u_hat = time_part('prediction vectors', prediction_fn,
                    (params['class_capsules']['weights'], capsules), (0, 1))
  digit_capsules = time_part(f'routing (r={model.routing_iterations})',
                             routing_fn, (u_hat,), (0,))
  reconstructions = time_part('decoder', decoder_fn,
                              (params['decoder'], digit_capsules), (0, 1))
  time_part('losses', losses_fn, (digit_capsules, reconstructions), (0, 1))

  # The parts chained must give the model's output.
  full = jax.jit(model.apply)({'params': params}, images, labels)
  difference = float(jnp.max(jnp.abs(
      full.lengths - capsjax.capsule_lengths(digit_capsules))))
  tolerance = 1e-4 if config.precision == 'float32' else 2e-2
  if not difference <= tolerance:
    raise AssertionError(f'the parts chained differ from the model: max '
                         f'|length difference| = {difference}')

  print('  optimizer update...', flush=True)
  gradients = jax.tree.map(
      lambda p: jnp.asarray(np.full(p.shape, 1e-3, p.dtype)), params)
  results['optimizer update (Adam)'] = {
      'forward': None,
      'forward_backward': common.benchmark(
          lambda state, grads: state.apply_gradients(grads=grads),
          (common.state_for(base_state, config), gradients),
          donate_argnums=(0,),
          next_args=lambda args, state: (state, args[1]), **kwargs),
  }

  print('  input pipeline...', flush=True)
  rng = np.random.default_rng(0)
  examples = max(MNIST_TRAIN_EXAMPLES, images.shape[0])
  data = (rng.random((examples, *images.shape[1:]), dtype=np.float32),
          rng.integers(0, 10, examples, dtype=np.int32))
  results['input pipeline (host, train_batch)'] = {
      'forward': common.benchmark_host(
          lambda step: batching.train_batch(data, step, images.shape[0],
                                            seed=0),
          repeats, warmup),
      'forward_backward': None,
  }
  return {'parts': results, 'chained_parts_max_length_difference': difference,
          'note': 'each part jitted and timed in isolation; the sum is not '
                  'the step time (no fusion or overlap across parts)'}


def print_breakdown(precision: str, result: dict[str, Any],
                    step_s: float) -> None:
  parts = result['parts']

  def cost(part):  # What a training step spends on the part.
    timing = part['forward_backward'] or part['forward']
    return timing['median_s']

  total = sum(cost(part) for part in parts.values())
  rows = [[name,
           common.ms(part['forward'] and part['forward']['median_s']),
           common.ms(part['forward_backward']
                     and part['forward_backward']['median_s']),
           f'{100 * cost(part) / total:.1f}%']
          for name, part in parts.items()]
  rows.append(['sum of parts (fwd+bwd, update, input)', '', common.ms(total),
               '100.0%'])
  rows.append(['full training step (one jit)', '', common.ms(step_s),
               f'{100 * step_s / total:.1f}%'])
  print(f'\nbreakdown, {precision} (median ms; each part jitted and timed '
        'alone):')
  print(common.format_table(['part', 'forward', 'fwd+bwd', 'share'], rows))


# ---------------------------------------------------------------------------
# PyTorch.


def run_torch(args, precisions: list[str]) -> dict[str, Any]:
  which = ('both' if set(precisions) == {'float32', 'bfloat16'}
           else precisions[0])
  with tempfile.TemporaryDirectory(prefix='capsjax_torch_') as directory:
    out = Path(directory) / 'torch.json'
    options = ['--batch-size', str(args.batch_size), '--steps',
               str(args.steps), '--warmup', str(args.warmup), '--precision',
               which, '--threads', str(args.threads)]
    command = [args.torch_python, str(TORCH_SCRIPT), *options, '--out',
               str(out)]
    # As printed and recorded: no path of this machine.
    shown = [Path(args.torch_python).name,
             str(TORCH_SCRIPT.relative_to(TORCH_SCRIPT.parents[1])), *options]
    print('running ' + ' '.join(shown), flush=True)
    try:
      # The same allocator settings as this process: like for like.
      environment = dict(os.environ)
      if not args.system_malloc:
        environment.update(common.ALLOCATOR_ENVIRONMENT)
      process = subprocess.run(command, capture_output=True, text=True,
                               check=False, env=environment)
    except OSError as error:
      raise SystemExit(f'cannot run {args.torch_python}: {error}') from error
    if process.returncode != 0:
      raise SystemExit(f'the PyTorch reference failed (exit '
                       f'{process.returncode}):\n{process.stdout[-2000:]}\n'
                       f'{process.stderr[-4000:]}')
    summary = process.stdout[process.stdout.find('summary'):]
    print('PyTorch ' + '\n'.join(line for line in summary.strip().splitlines()
                                  if not line.startswith('wrote ')))
    report = json.loads(out.read_text())
  report['command'] = shown
  return report


def speed_ratios(results: dict[str, Any], torch_report: dict[str, Any]
                 ) -> dict[str, Any]:
  ratios = {}
  for precision, result in results.items():
    torch_result = torch_report['results'].get(precision)
    if torch_result:
      ratios[precision] = {
          'jax_median_step_s': result['median_step_s'],
          'torch_median_step_s': torch_result['median_step_s'],
          'jax_speedup': (torch_result['median_step_s']
                          / result['median_step_s']),
      }
  return ratios


# ---------------------------------------------------------------------------


def skipped_precisions(precisions: list[str], machine: dict[str, Any],
                       emulated_bfloat16: bool) -> dict[str, str]:
  """{precision: why it is not timed} for this machine."""
  if (emulated_bfloat16 or 'bfloat16' not in precisions
      or machine['backend'] != 'cpu' or machine['cpu_bfloat16'] is not False):
    return {}
  return {'bfloat16': (
      f"this CPU ({machine['cpu_model']}) has no bfloat16 instructions "
      f"(none of {', '.join(common.BFLOAT16_CPU_FLAGS)} in /proc/cpuinfo): "
      'bfloat16 is emulated in float32 here, so its step time would not '
      'say how the bfloat16 mode performs')}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  machine = common.set_up_machine(args)
  check_compiler_options(args.compiler_option)
  skipped = skipped_precisions(args.precision, machine, args.emulated_bfloat16)
  for precision, reason in skipped.items():
    print(f'{precision}: not timed: {reason}', flush=True)
  args.precision = [p for p in args.precision if p not in skipped]
  configs = {
      precision: common.make_config(
          batch_size=args.batch_size, precision=precision,
          routing_iterations=args.routing_iterations,
          stop_gradient_intermediate=args.stop_gradient, small=args.small,
          conv_method=args.conv_method)
      for precision in args.precision}
  base_state = common.create_state(common.make_config(small=args.small))
  batch = common.random_batch(args.batch_size)

  results = {}
  for precision, config in configs.items():
    print(f'{precision}: training step...', flush=True)
    results[precision] = time_step(config, base_state, batch, args)

  experiment_results = {}
  if args.experiments:
    if 'float32' not in results:
      raise SystemExit('--experiments compares with the float32 MNIST step: '
                       'include float32 in --precision')
    for name in args.experiments:
      print(f'{name}: training step...', flush=True)
      experiment_results[name] = time_experiment(name, args,
                                                 results['float32'])

  evaluations = {}
  if args.evaluation:
    for precision, config in configs.items():
      print(f'{precision}: evaluation against training...', flush=True)
      evaluations[precision] = time_evaluation(
          config, base_state, batch, args.evaluation_rounds)

  compiler_options = {}
  if args.compiler_option:
    for precision, config in configs.items():
      print(f'{precision}: XLA compiler options...', flush=True)
      compiler_options[precision] = time_compiler_options(
          config, base_state, batch, args.compiler_option,
          args.compiler_option_rounds)

  breakdowns = None
  if args.breakdown:
    breakdowns = {}
    for precision, config in configs.items():
      print(f'{precision}: breakdown...', flush=True)
      breakdowns[precision] = breakdown(config, base_state, batch, args.steps,
                                        args.warmup)
  profile_tables = None
  if args.profile:
    runs = {precision: (config, base_state, batch)
            for precision, config in configs.items()}
    for name in args.experiments:
      config, _, experiment_batch, state = experiment_inputs(
          name, args.batch_size)
      runs[name] = (config, state, experiment_batch)
    profile_tables = profile(args.profile, runs, args.profile_steps)
  torch_report = ratios = None
  if args.torch and args.precision:
    torch_report = run_torch(args, args.precision)
    ratios = speed_ratios(results, torch_report)
  machine['loadavg_end'] = list(os.getloadavg())

  print(f'\ntraining step, batch {args.batch_size}, r='
        f'{args.routing_iterations}{", small model" if args.small else ""}: '
        f'median of at least {args.steps} steps after {args.warmup} '
        f'warm-up ({args.min_timed_seconds:g} s and '
        f'{args.min_warmup_seconds:g} s at least)')
  rows = []
  for precision, result in results.items():
    rows.append([
        precision, result['steps_timed'], f"{result['median_step_s']:.4f}",
        f"{result['iqr_step_s']:.4f}", f"{result['min_step_s']:.4f}",
        f"{result['max_step_s']:.4f}", f"{result['images_per_s']:.1f}",
        f"{result['compile_s']:.1f}", common.megabytes(result['memory']),
        f"{result['flops_per_step'] / 1e9:.2f}",
        f"{result['flops_per_s'] / 1e9:.1f}",
        f"{result['matmul']['flops_per_s'] / 1e9:.1f}",
        f"{100 * result['fraction_of_matmul_peak']:.1f}%",
        '-' if not result['flops_executed'] else
        f"{result['flops_executed'] / 1e9:.2f}",
        '-' if not result['executed_fraction_of_matmul_peak'] else
        f"{100 * result['executed_fraction_of_matmul_peak']:.1f}%",
        '-' if result['median_page_faults'] is None else
        f"{result['median_page_faults']:.0f}"])
  print(common.format_table(
      ['precision', 'steps', 'median s', 'IQR s', 'min s', 'max s', 'img/s',
       'compile s', 'peak MB', 'model GFLOP/step', 'GFLOP/s',
       'matmul GFLOP/s', 'model FLOPs of matmul rate',
       'executed GFLOP/step', 'executed of matmul rate',
       'page faults per step'], rows))
  print("\nmemory traffic: XLA's bytes accessed per step (each operation's "
        'operands and output, once) at the rate of y = 2 x on float32 arrays '
        f'of {STREAM_BYTES // 2**20} MB, same run:')
  print(common.format_table(
      ['precision', 'GB accessed/step', 'streaming GB/s',
       's at streaming rate', 'of the step'],
      [[precision, '-' if not result['bytes_accessed'] else
        f"{result['bytes_accessed'] / 1e9:.2f}",
        f"{result['stream']['bytes_per_s'] / 1e9:.1f}",
        '-' if not result['bytes_at_stream_rate_s'] else
        f"{result['bytes_at_stream_rate_s']:.4f}",
        '-' if not result['bytes_at_stream_rate_fraction'] else
        f"{100 * result['bytes_at_stream_rate_fraction']:.0f}%"]
       for precision, result in results.items()]))
  if experiment_results:
    print('\nother experiments, float32 (predicted: the MNIST step time '
          "scaled by XLA's executed FLOPs):")
    print(common.format_table(
        ['experiment', 'input', 'steps', 'median s', 'IQR s', 'img/s',
         'executed GFLOP', 'predicted s', 'measured / predicted',
         'page faults per step'],
        [[name, 'x'.join(map(str, r['image_shape'])), r['steps_timed'],
          f"{r['median_step_s']:.4f}", f"{r['iqr_step_s']:.4f}", f"{r['images_per_s']:.1f}",
          f"{(r['flops_executed'] or 0) / 1e9:.2f}",
          f"{r.get('predicted_step_s', float('nan')):.4f}",
          f"{r.get('slowdown', float('nan')):.2f}",
          '-' if r['median_page_faults'] is None
          else f"{r['median_page_faults']:.0f}"]
         for name, r in experiment_results.items()]))
  if evaluations:
    print(f'\nevaluation against training, {args.evaluation_rounds} rounds '
          'alternating in this process:')
    print(common.format_table(
        ['precision', 'eval img/s', 'train img/s', 'eval / train (median)',
         'range over rounds', 'images per eval call', 'steps per round'],
        [[precision, f"{e['eval_images_per_s']:.1f}",
          f"{e['train_images_per_s']:.1f}", f"{e['median_ratio']:.2f}x",
          f"{min(e['ratios']):.2f}-{max(e['ratios']):.2f}",
          e['images_per_call'], e['steps_per_round']]
         for precision, e in evaluations.items()]))
  if compiler_options:
    print(f'\nXLA compiler options, {args.compiler_option_rounds} rounds of '
          '3 steps alternating in this process:')
    print(common.format_table(
        ['precision', 'compiled with', 'median step s',
         'time / defaults (median of rounds)', 'compile s'],
        [[precision, variant['label'], f"{variant['median_step_s']:.4f}",
          f"{variant['median_ratio_to_defaults']:.3f}",
          f"{variant['compile_s']:.1f}"]
         for precision, result in compiler_options.items()
         for variant in result['variants']]))
  if breakdowns:
    for precision, result in breakdowns.items():
      print_breakdown(precision, result, results[precision]['median_step_s'])
  if ratios:
    print('\nJAX vs PyTorch (median step time):')
    for precision, ratio in ratios.items():
      speedup = ratio['jax_speedup']
      verdict = (f'JAX is {speedup:.2f}x faster' if speedup >= 1 else
                 f'JAX is {1 / speedup:.2f}x slower')
      print(f"  {precision}: JAX {ratio['jax_median_step_s']:.3f} s, "
            f"PyTorch {ratio['torch_median_step_s']:.3f} s: {verdict}")

  report = {
      'benchmark': 'train_step',
      'settings': {
          'batch_size': args.batch_size, 'steps': args.steps,
          'warmup': args.warmup,
          'min_warmup_seconds': args.min_warmup_seconds,
          'min_timed_seconds': args.min_timed_seconds,
          'precisions': args.precision,
          'routing_iterations': args.routing_iterations,
          'stop_gradient_intermediate': args.stop_gradient,
          'small': args.small, 'torch_threads': args.threads,
          'conv_method': args.conv_method,
          'evaluation_rounds': (args.evaluation_rounds if args.evaluation
                                else None),
          'compiler_options': [f'{name}={value}'
                               for name, value in args.compiler_option],
          'reuse_freed_host_memory': not args.system_malloc,
          'matmul': 'square jnp.dot, same FLOPs and input dtype, float32 '
                    'accumulation and output',
      },
      'results': results,
      'torch': torch_report,
      'speed_ratios': ratios,
      'skipped': skipped,
      'experiments': experiment_results or None,
      'breakdown': breakdowns,
      'evaluation': evaluations or None,
      'compiler_options': compiler_options or None,
      'profile': profile_tables,
      'machine': machine,
  }
  if args.out:
    common.write_json(args.out, report)
  return report


if __name__ == '__main__':
  main()
