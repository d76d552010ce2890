"""Cost (and optionally accuracy) of the number of routing iterations.

For each routing iteration count r (`--iterations 1,2,3,4,5`) and each
gradient mode (`--stop-gradient false,true`: `stop_gradient_intermediate` of
`capsjax.routing.dynamic_routing` / the model config):

- `dynamic_routing` alone at `--shape batch,in,out,in_dim,out_dim` (default
  the MNIST DigitCaps: 128,1152,10,8,16): the forward pass, and forward +
  backward of a scalar loss (sum of squared outputs) with respect to u_hat;
- the full training step (`train.train.train_step`: CapsNet with decoder,
  margin + reconstruction loss, Adam) at `--batch-size`;

each with compile time, median / IQR / min / max over `--repeats` timed calls
(after `--warmup`), peak memory from XLA's memory analysis of the compiled
program (argument + output + temporaries, see benchmarks/common.py) and
images/s. `--repeats 0` only compiles: compile times and memory, no timing.

The memory column shows whether the backward pass's memory grows with r: with
the stopped gradient nothing needs to be kept per iteration; without it, the
backward pass keeps each iteration's routing logits and coupling
coefficients. The script prints that finding as a sentence.

`--accuracy --epochs E` also trains each configuration with
`train.train.train_and_evaluate` (real MNIST; `--train-examples`,
`--eval-examples`, `--max-steps` for quick runs) and records the best-on-
validation accuracy and its test accuracy.

Examples:

    python benchmarks/routing_iterations.py --out r.json --plot r.png
    python benchmarks/routing_iterations.py --repeats 0      # memory only
    python benchmarks/routing_iterations.py --accuracy --epochs 1 \\
        --train-examples 5000 --eval-examples 1000 --out routing.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

if __package__ in (None, ''):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from capsjax import routing  # pylint: disable=g-import-not-at-top
from capsjax.nonlinearity import squash  # pylint: disable=g-import-not-at-top
from train import models  # pylint: disable=g-import-not-at-top

MNIST_SHAPE = (128, 1152, 10, 8, 16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = common.make_parser(__doc__)
  parser.add_argument('--iterations', default='1,2,3,4,5',
                      help='routing iteration counts, comma-separated')
  parser.add_argument('--shape', default=','.join(map(str, MNIST_SHAPE)),
                      help='routing alone: batch,in_capsules,out_capsules,'
                      'in_dim,out_dim (default: MNIST DigitCaps)')
  parser.add_argument('--stop-gradient', default='false,true',
                      help='gradient modes (stop_gradient_intermediate), '
                      'comma-separated true/false')
  parser.add_argument('--batch-size', type=int, default=128,
                      help='batch of the full training step')
  parser.add_argument('--precision', default='float32',
                      choices=tuple(models.PRECISIONS),
                      help='config.precision of the training step')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed calls per measurement; 0: compile only')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed calls after compilation')
  parser.add_argument('--small', action='store_true',
                      help='a tiny CapsNet (smoke tests; routing alone '
                      'follows --shape; the accuracy runs keep 9x9 kernels, '
                      'train_and_evaluate builds its own model)')
  parser.add_argument('--no-train-step', action='store_true',
                      help='time routing alone only')
  parser.add_argument('--accuracy', action='store_true',
                      help='also train each configuration and record '
                      'validation and test accuracy')
  common.add_training_budget_arguments(parser)
  parser.add_argument('--out', help='write the results as JSON here')
  common.add_allocator_argument(parser)
  parser.add_argument('--plot', help='write a PNG plot here')
  args = parser.parse_args(argv)
  try:
    args.iterations = common.parse_int_list(args.iterations)
    args.shape = tuple(common.parse_int_list(args.shape))
    args.stop_gradient = common.parse_bool_list(args.stop_gradient)
  except ValueError as error:
    parser.error(str(error))
  if min(args.iterations) < 1:
    parser.error('--iterations must all be >= 1')
  if len(args.shape) != 5 or min(args.shape) < 1:
    parser.error('--shape needs 5 positive integers: '
                 'batch,in_capsules,out_capsules,in_dim,out_dim')
  if args.repeats < 0 or args.warmup < 0 or args.batch_size < 1:
    parser.error('--repeats, --warmup must be >= 0, --batch-size >= 1')
  common.check_training_budget(parser, args, args.accuracy)
  return args


# ---------------------------------------------------------------------------
# Measurements.


def make_u_hat(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  """Prediction vectors as the model makes them: W u of squashed capsules."""
  batch, in_capsules, out_capsules, in_dim, out_dim = shape
  u = common.random_normal((batch, in_capsules, in_dim), seed)
  weights = common.random_normal(
      (in_capsules, out_capsules, in_dim, out_dim), seed + 1, scale=0.01)
  return jax.block_until_ready(jax.jit(
      lambda u, w: routing.prediction_vectors(squash(u), w))(u, weights))


def time_routing(u_hat: jax.Array, iterations: int, stop_gradient: bool,
                 repeats: int, warmup: int) -> dict[str, Any]:
  """Forward, and forward + backward w.r.t. u_hat, of dynamic_routing."""

  def forward(u_hat):
    return routing.dynamic_routing(
        u_hat, iterations, stop_gradient_intermediate=stop_gradient)

  def loss(u_hat):
    return jnp.sum(jnp.square(forward(u_hat)))

  kwargs = dict(repeats=repeats, warmup=warmup, batch_size=u_hat.shape[0])
  return {
      'forward': common.benchmark(forward, (u_hat,), **kwargs),
      'forward_backward': common.benchmark(jax.value_and_grad(loss),
                                           (u_hat,), **kwargs),
  }


def time_train_step(base_state, batch, args, iterations: int,
                    stop_gradient: bool) -> dict[str, Any]:
  config = common.make_config(
      batch_size=args.batch_size, precision=args.precision,
      routing_iterations=iterations, stop_gradient_intermediate=stop_gradient,
      small=args.small)
  state = common.state_for(base_state, config)
  return common.benchmark_train_step(config, state, batch,
                                     repeats=args.repeats, warmup=args.warmup)


def train_for_accuracy(args, iterations: int, stop_gradient: bool,
                       workdir: Path) -> dict[str, Any]:
  """train.train.train_and_evaluate on real MNIST, for one configuration."""
  config = common.make_config(
      batch_size=args.batch_size, precision=args.precision,
      routing_iterations=iterations, stop_gradient_intermediate=stop_gradient,
      small=args.small)
  run_dir = workdir / f'r{iterations}_stop_gradient_{stop_gradient}'.lower()
  return common.train_for_accuracy(config, args, run_dir)


# ---------------------------------------------------------------------------
# The memory finding.


def memory_trend(points: list[tuple[int, float]]) -> dict[str, Any]:
  """Does peak memory (MB) grow with the iteration count?

  flat_from: the smallest r from which every larger r measured has the same
  peak (within 0.5%), or None. growth_mb_per_iteration: the slope between the
  last two iteration counts measured.
  """
  points = sorted(points)
  iterations = [r for r, _ in points]
  peaks = [peak for _, peak in points]
  result: dict[str, Any] = {'iterations': iterations, 'peak_mb': peaks,
                            'flat_from': None,
                            'growth_mb_per_iteration': None}
  if len(points) < 2:
    return result
  result['growth_mb_per_iteration'] = (
      (peaks[-1] - peaks[-2]) / (iterations[-1] - iterations[-2]))
  for start in range(len(points) - 1):
    tolerance = max(0.005 * peaks[start], 1e-3)
    if all(abs(peak - peaks[start]) <= tolerance for peak in peaks[start:]):
      result['flat_from'] = iterations[start]
      break
  return result


def _describe(trend: dict[str, Any]) -> str:
  values = ', '.join(f'r={r}: {common.format_mb(peak)}'
                     for r, peak in zip(trend['iterations'], trend['peak_mb']))
  growth = trend['growth_mb_per_iteration']
  if growth is None:
    return f'{values} MB (measure two iteration counts or more to see a trend)'
  if trend['flat_from'] is not None:
    return f'stays flat from r={trend["flat_from"]} on ({values} MB)'
  last, before = trend['iterations'][-1], trend['iterations'][-2]
  verb = 'grows' if growth >= 0 else 'shrinks'
  return (f'{verb} by {common.format_mb(abs(growth))} MB per extra iteration '
          f'from r={before} to r={last} ({values} MB)')


def memory_finding(rows: list[dict[str, Any]], shape, batch_size: int
                   ) -> dict[str, Any]:
  finding: dict[str, Any] = {}
  sentences = []
  for key, what in (('routing_forward_backward',
                     f'dynamic_routing forward+backward at shape {shape}'),
                    ('train_step',
                     f'the full training step at batch {batch_size}')):
    trends = {}
    for stop_gradient in (True, False):
      points = [(row['iterations'],
                 row[key]['memory']['peak_bytes'] / common.MB)
                for row in rows
                if row['stop_gradient_intermediate'] == stop_gradient
                and row.get(key) and row[key]['memory']]
      if points:
        trends[f'stop_gradient_intermediate={stop_gradient}'] = (
            memory_trend(points))
    if not trends:
      continue
    finding[key] = trends
    parts = [f'with {mode} it {_describe(trend)}'
             for mode, trend in trends.items()]
    sentences.append(f'Peak memory of {what} (XLA memory analysis): '
                     + '; '.join(parts) + '.')
  finding['sentence'] = ' '.join(sentences)
  return finding


# ---------------------------------------------------------------------------
# Output.


def print_table(rows: list[dict[str, Any]], accuracy: bool) -> None:
  headers = ['r', 'stop grad', 'route fwd ms', 'route fwd+bwd ms',
             'fwd+bwd MB', 'step s', 'step img/s', 'step MB', 'step compile s']
  if accuracy:
    headers += ['val acc', 'test acc']
  table = []
  for row in rows:
    routing_fwd = row['routing_forward']
    routing_bwd = row['routing_forward_backward']
    step = row.get('train_step')

    def timed(result, scale=1e3):
      return '-' if result['median_s'] is None else common.spread(result,
                                                                  scale)

    cells = [row['iterations'], str(row['stop_gradient_intermediate']),
             timed(routing_fwd), timed(routing_bwd),
             common.megabytes(routing_bwd['memory'])]
    if step:
      cells += [timed(step, 1),
                '-' if step['images_per_s'] is None
                else f"{step['images_per_s']:.1f}",
                common.megabytes(step['memory']), f"{step['compile_s']:.1f}"]
    else:
      cells += ['-'] * 4
    if accuracy:
      result = row.get('accuracy') or {}
      cells += [f"{result['validation_accuracy']:.4f}" if result else '-',
                f"{result['test_accuracy']:.4f}" if result else '-']
    table.append(cells)
  print(common.format_table(headers, table))
  print('times: median (IQR); memory: peak MB from XLA memory_analysis')


def plot(path: str, rows: list[dict[str, Any]], settings: dict[str, Any]
         ) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  has_step = any(row.get('train_step') for row in rows)
  has_accuracy = any(row.get('accuracy') for row in rows)
  panels = 2 + has_step + has_accuracy
  figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0))
  modes = sorted({row['stop_gradient_intermediate'] for row in rows})

  def series(key, stop_gradient, value):
    picked = [row for row in rows
              if row['stop_gradient_intermediate'] == stop_gradient
              and row.get(key)]
    return ([row['iterations'] for row in picked],
            [value(row[key]) for row in picked])

  def time_panel(axis, key, label, scale, unit, stop_gradient):
    picked = [row[key] for row in rows
              if row['stop_gradient_intermediate'] == stop_gradient
              and row.get(key) and row[key]['median_s'] is not None]
    if not picked:
      return
    iterations = [row['iterations'] for row in rows
                  if row['stop_gradient_intermediate'] == stop_gradient
                  and row.get(key) and row[key]['median_s'] is not None]
    median = [scale * r['median_s'] for r in picked]
    low = [scale * (r['median_s'] - r['min_s']) for r in picked]
    high = [scale * (r['max_s'] - r['median_s']) for r in picked]
    axis.errorbar(iterations, median, yerr=[low, high], marker='o',
                  capsize=3, label=label)
    axis.set_ylabel(unit)

  axis = axes[0]
  for stop_gradient in modes:
    tag = 'stopped' if stop_gradient else 'full'
    time_panel(axis, 'routing_forward', f'forward ({tag} grad. mode)', 1e3,
               'ms', stop_gradient)
    time_panel(axis, 'routing_forward_backward', f'fwd+bwd, {tag} gradient',
               1e3, 'ms', stop_gradient)
  axis.set_title(f"dynamic_routing alone, shape {settings['shape']}",
                 fontsize=9)

  panel = 1
  if has_step:
    axis = axes[panel]
    panel += 1
    for stop_gradient in modes:
      tag = 'stopped' if stop_gradient else 'full'
      time_panel(axis, 'train_step', f'{tag} gradient', 1.0, 's',
                 stop_gradient)
    axis.set_title(f"training step, batch {settings['batch_size']}"
                   f"{' (small model)' if settings['small'] else ''}",
                   fontsize=9)

  axis = axes[panel]
  panel += 1
  for stop_gradient in modes:
    tag = 'stopped' if stop_gradient else 'full'
    x, y = series('routing_forward_backward', stop_gradient,
                  lambda r: r['memory']['peak_bytes'] / common.MB)
    axis.plot(x, y, marker='o', label=f'routing fwd+bwd, {tag} gradient')
  axis.set_ylabel('peak MB (XLA memory analysis)')
  axis.set_ylim(bottom=0)
  axis.set_title('backward-pass memory', fontsize=9)

  if has_accuracy:
    axis = axes[panel]
    for stop_gradient in modes:
      tag = 'stopped' if stop_gradient else 'full'
      for metric in ('validation_accuracy', 'test_accuracy'):
        x, y = series('accuracy', stop_gradient, lambda r, m=metric: r[m])
        axis.plot(x, y, marker='o',
                  label=f"{metric.split('_')[0]}, {tag} gradient")
    axis.set_ylabel('accuracy')
    axis.set_title(f"accuracy after {settings['epochs']} epoch(s)"
                   + (f", <= {settings['max_steps']} steps"
                      if settings['max_steps'] > 0 else ''), fontsize=9)

  figure.suptitle('capsjax routing iterations: times are medians, bars '
                  'from min to max', fontsize=9)
  for axis in axes:
    axis.set_xlabel('routing iterations r')
    axis.set_xticks(sorted({row['iterations'] for row in rows}))
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=7)
  common.save_figure(figure, path)


# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  machine = common.set_up_machine(args)
  settings = {
      'iterations': args.iterations, 'shape': list(args.shape),
      'stop_gradient': args.stop_gradient, 'batch_size': args.batch_size,
      'precision': args.precision, 'repeats': args.repeats,
      'warmup': args.warmup, 'small': args.small,
      'train_step': not args.no_train_step, 'accuracy': args.accuracy,
      **common.training_budget(args),
      'routing_loss': 'sum of squared outputs, gradient w.r.t. u_hat',
  }

  u_hat = make_u_hat(args.shape)
  base_state = batch = None
  if not args.no_train_step:
    base_state = common.create_state(common.make_config(small=args.small))
    batch = common.random_batch(args.batch_size)

  rows = []
  for iterations in args.iterations:
    for stop_gradient in args.stop_gradient:
      print(f'r={iterations} stop_gradient_intermediate={stop_gradient}: '
            'routing alone...', flush=True)
      routing_results = time_routing(u_hat, iterations, stop_gradient,
                                     args.repeats, args.warmup)
      row = {'iterations': iterations,
             'stop_gradient_intermediate': stop_gradient,
             'routing_forward': routing_results['forward'],
             'routing_forward_backward': routing_results['forward_backward'],
             'train_step': None}
      if base_state is not None:
        print('  training step...', flush=True)
        row['train_step'] = time_train_step(base_state, batch, args,
                                            iterations, stop_gradient)
      rows.append(row)

  if args.accuracy:
    with tempfile.TemporaryDirectory(prefix='capsjax_routing_') as temporary:
      workdir = Path(args.workdir or temporary)
      for row in rows:
        print(f"training r={row['iterations']} stop_gradient_intermediate="
              f"{row['stop_gradient_intermediate']} for accuracy...",
              flush=True)
        row['accuracy'] = train_for_accuracy(
            args, row['iterations'], row['stop_gradient_intermediate'],
            workdir)

  finding = memory_finding(rows, args.shape, args.batch_size)
  machine['loadavg_end'] = list(os.getloadavg())
  print()
  print_table(rows, args.accuracy)
  print()
  print(finding['sentence'])
  report = {'benchmark': 'routing_iterations', 'settings': settings,
            'results': rows, 'memory_finding': finding, 'machine': machine}
  if args.out:
    common.write_json(args.out, report)
  if args.plot:
    plot(args.plot, rows, settings)
  return report


if __name__ == '__main__':
  main()
