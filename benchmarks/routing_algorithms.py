"""Every routing algorithm of `capsjax.routing`, side by side.

1. Cost, at the MNIST class-capsule shape (`--shape batch,in,out,dim`,
   default 128,1152,10,16: 1152 primary capsules voting for 10 classes with
   16-D votes, which EM reads as 4x4 poses): for each algorithm ('dynamic',
   'em', 'self_attention', 'none') and, for the iterative ones, each
   iteration count (`--iterations`), the forward pass and forward + backward
   of a scalar loss (sum of squared output poses plus the sum of the output
   activations) with respect to the votes, through `capsjax.routing.route`:
   compile time, median / IQR / min / max over `--repeats` calls, and the
   peak memory of the compiled program (XLA's memory analysis: argument +
   output + temporaries; see benchmarks/common.py). EM also takes input
   activations (uniform in (0, 1)); the others read presence from the votes.

2. `--accuracy`: an equal-budget comparison. The paper's MNIST network
   (`--config.model.routing=...`, the same layers, initialisation, data,
   augmentation, optimizer, batch and number of steps for every algorithm;
   r = `--train-iterations` for the iterative ones) is trained with
   `train.train.train_and_evaluate` on each of `--datasets` (MNIST and
   Fashion-MNIST by default, read from ../shared/data when present), and the
   best-on-validation checkpoint's validation and test accuracy recorded.
   `--epochs`, `--max-steps`, `--train-examples`, `--eval-examples` set the
   budget; the wall time of each run is recorded beside it.

Examples:

    python benchmarks/routing_algorithms.py --out a.json --plot a.png
    python benchmarks/routing_algorithms.py --repeats 0          # memory only
    python benchmarks/routing_algorithms.py --no-cost --accuracy \\
        --max-steps 300 --train-examples 19200 --eval-examples 2000 \\
        --out accuracy.json --plot accuracy.png
    python benchmarks/routing_algorithms.py --merge a.json accuracy.json \\
        --out both.json --plot both.png     # one table and plot of both runs
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ''):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from capsjax import routing  # pylint: disable=g-import-not-at-top

MNIST_SHAPE = (128, 1152, 10, 16)
ITERATIVE = ('dynamic', 'em')


def parse_args(argv: Sequence[str] | None):
  parser = common.make_parser(__doc__)
  parser.add_argument('--algorithms', default=','.join(routing.ALGORITHMS),
                      help='comma-separated, from '
                      f'{", ".join(routing.ALGORITHMS)}')
  parser.add_argument('--iterations', default='1,2,3,4,5',
                      help='iteration counts of the iterative algorithms')
  parser.add_argument('--shape', default=','.join(map(str, MNIST_SHAPE)),
                      help='batch,in_capsules,out_capsules,dim (EM needs '
                      'dim = 16, a 4x4 pose)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed calls per measurement; 0: compile only')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--no-cost', action='store_true',
                      help='skip part 1 (the cost of routing alone)')
  parser.add_argument('--accuracy', action='store_true',
                      help='part 2: train the MNIST network with each '
                      'algorithm on each dataset')
  parser.add_argument('--datasets', default='mnist,fashion_mnist')
  parser.add_argument('--train-iterations', type=int, default=3,
                      help='routing iterations of the trained networks')
  parser.add_argument('--batch-size', type=int, default=128)
  common.add_training_budget_arguments(parser)
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--plot', help='write a PNG plot here')
  parser.add_argument('--merge', nargs='+', metavar='JSON',
                      help='measure nothing: combine the cost and accuracy '
                      'of earlier reports into one table, --out and --plot')
  args = parser.parse_args(argv)
  if args.merge:
    return args
  try:
    args.algorithms = [name.strip() for name in args.algorithms.split(',')
                       if name.strip()]
    args.iterations = common.parse_int_list(args.iterations)
    args.shape = tuple(common.parse_int_list(args.shape))
  except ValueError as error:
    parser.error(str(error))
  unknown = [name for name in args.algorithms
             if name not in routing.ALGORITHMS]
  if unknown or not args.algorithms:
    parser.error(f'--algorithms: unknown {unknown}; choose from '
                 f'{", ".join(routing.ALGORITHMS)}')
  args.datasets = [name.strip() for name in args.datasets.split(',')
                   if name.strip()]
  if not set(args.datasets) <= {'mnist', 'fashion_mnist'} or not args.datasets:
    parser.error('--datasets: mnist and/or fashion_mnist')
  if min(args.iterations) < 1 or args.train_iterations < 1:
    parser.error('--iterations and --train-iterations must be >= 1')
  if len(args.shape) != 4 or min(args.shape) < 1:
    parser.error('--shape needs 4 positive integers: '
                 'batch,in_capsules,out_capsules,dim')
  if 'em' in args.algorithms and args.shape[3] != 16:
    parser.error(f'--shape: EM routing reads the {args.shape[3]}-D votes as '
                 '4x4 poses: dim must be 16')
  if args.repeats < 0 or args.warmup < 0 or args.batch_size < 1:
    parser.error('--repeats, --warmup must be >= 0, --batch-size >= 1')
  if args.no_cost and not args.accuracy:
    parser.error('--no-cost leaves nothing to do without --accuracy')
  common.check_training_budget(parser, args, args.accuracy)
  return args


# ---------------------------------------------------------------------------
# Part 1: the cost of routing alone.


def make_inputs(shape: tuple[int, ...], seed: int = 0):
  """(votes `(batch, in, out, dim)`, input activations `(batch, in)`)."""
  batch, in_capsules, _, _ = shape
  votes = common.random_normal(shape, seed, scale=0.05)
  activations = jnp.asarray(
      np.random.default_rng(seed + 1).uniform(
          0.05, 0.95, (batch, in_capsules)).astype(np.float32))
  return votes, activations


def route_fn(algorithm: str, iterations: int, shape: tuple[int, ...]):
  """(votes, activations) -> RoutingOutput, with the algorithm's learned
  parameters at their initial values (zeros, as `CapsuleLayer`'s)."""
  _, in_capsules, out_capsules, _ = shape
  parameters: dict[str, Any] = {}
  if algorithm == 'em':
    parameters = {'beta_u': jnp.zeros((out_capsules,)),
                  'beta_a': jnp.zeros((out_capsules,))}
  elif algorithm == 'self_attention':
    parameters = {'log_priors': jnp.zeros((in_capsules, out_capsules))}

  def forward(votes, activations):
    if algorithm == 'em':
      return routing.route('em', votes.reshape(*votes.shape[:3], 4, 4),
                           activations, num_iterations=iterations,
                           **parameters)
    return routing.route(algorithm, votes, num_iterations=iterations,
                         **parameters)

  return forward


def time_algorithm(algorithm: str, iterations: int, votes, activations,
                   repeats: int, warmup: int) -> dict[str, Any]:
  forward = route_fn(algorithm, iterations, votes.shape)

  def loss(votes, activations):
    output = forward(votes, activations)
    return jnp.sum(jnp.square(output.poses)) + jnp.sum(output.activations)

  kwargs = dict(repeats=repeats, warmup=warmup, batch_size=votes.shape[0])
  return {
      'forward': common.benchmark(forward, (votes, activations), **kwargs),
      'forward_backward': common.benchmark(
          jax.value_and_grad(loss), (votes, activations), **kwargs),
  }


def cost_rows(args) -> list[dict[str, Any]]:
  votes, activations = make_inputs(args.shape)
  rows = []
  for algorithm in args.algorithms:
    counts = args.iterations if algorithm in ITERATIVE else [None]
    for iterations in counts:
      print(f'{algorithm}' + (f' r={iterations}' if iterations else '')
            + '...', flush=True)
      results = time_algorithm(algorithm, iterations or 1, votes,
                               activations, args.repeats, args.warmup)
      rows.append({'algorithm': algorithm, 'iterations': iterations,
                   **results})
  return rows


# ---------------------------------------------------------------------------
# Part 2: equal-budget accuracy.


def accuracy_rows(args, workdir: Path) -> list[dict[str, Any]]:
  rows = []
  for dataset in args.datasets:
    for algorithm in args.algorithms:
      config = common.make_config(batch_size=args.batch_size,
                                  routing_iterations=args.train_iterations)
      config.dataset = dataset
      config.model.routing = algorithm
      print(f'training {algorithm} on {dataset}...', flush=True)
      result = common.train_for_accuracy(config, args,
                                         workdir / f'{dataset}_{algorithm}')
      rows.append({'dataset': dataset, 'algorithm': algorithm,
                   'iterations': (args.train_iterations
                                  if algorithm in ITERATIVE else None),
                   **result})
  return rows


# ---------------------------------------------------------------------------
# Output.


def print_tables(cost: list[dict[str, Any]],
                 accuracy: list[dict[str, Any]]) -> None:

  def timed(result):
    return '-' if result['median_s'] is None else common.spread(result)

  if cost:
    print(common.format_table(
        ['algorithm', 'r', 'fwd ms', 'fwd MB', 'fwd+bwd ms', 'fwd+bwd MB',
         'compile s'],
        [[row['algorithm'], row['iterations'] or '-',
          timed(row['forward']), common.megabytes(row['forward']['memory']),
          timed(row['forward_backward']),
          common.megabytes(row['forward_backward']['memory']),
          f"{row['forward_backward']['compile_s']:.1f}"] for row in cost]))
    print('times: median (IQR); memory: peak MB from XLA memory_analysis')
  if accuracy:
    print()
    print(common.format_table(
        ['dataset', 'algorithm', 'r', 'steps', 'val acc', 'test acc',
         'wall min'],
        [[row['dataset'], row['algorithm'], row['iterations'] or '-',
          row['checkpoint_step'], f"{row['validation_accuracy']:.4f}",
          f"{row['test_accuracy']:.4f}", f"{row['wall_s'] / 60:.1f}"]
         for row in accuracy]))


def plot(path: str, cost: list[dict[str, Any]],
         accuracy: list[dict[str, Any]], settings: dict[str, Any]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = (2 if cost else 0) + (1 if accuracy else 0)
  figure, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.0),
                              squeeze=False)
  axes = list(axes[0])
  algorithms = list(dict.fromkeys(row['algorithm'] for row in cost))
  if cost:
    iteration_ticks = sorted({row['iterations'] for row in cost
                              if row['iterations']})
    for axis, (key, scale, label) in zip(axes, (
        ('forward_backward', 1e3, 'fwd+bwd ms (median)'),
        ('memory', 1 / common.MB, 'fwd+bwd peak MB'))):
      for algorithm in algorithms:
        picked = [row for row in cost if row['algorithm'] == algorithm]
        if key == 'memory':
          values = [row['forward_backward']['memory']['peak_bytes'] * scale
                    for row in picked]
        elif picked[0]['forward_backward']['median_s'] is None:
          continue
        else:
          values = [row['forward_backward']['median_s'] * scale
                    for row in picked]
        if picked[0]['iterations'] is None:  # Non-iterative: one level.
          axis.axhline(values[0], linestyle='--', label=algorithm,
                       color=f'C{algorithms.index(algorithm)}')
        else:
          axis.plot([row['iterations'] for row in picked], values,
                    marker='o', label=algorithm,
                    color=f'C{algorithms.index(algorithm)}')
      axis.set_xlabel('routing iterations r')
      axis.set_xticks(iteration_ticks)
      axis.set_ylabel(label)
      axis.set_ylim(bottom=0)
      axis.set_title(f"routing alone, votes {tuple(settings['shape'])}",
                     fontsize=9)
  if accuracy:
    axis = axes[-1]
    datasets = list(dict.fromkeys(row['dataset'] for row in accuracy))
    names = list(dict.fromkeys(row['algorithm'] for row in accuracy))
    width = 0.8 / len(datasets)
    for index, dataset in enumerate(datasets):
      errors = [100 * (1 - next(row['test_accuracy'] for row in accuracy
                                if row['dataset'] == dataset
                                and row['algorithm'] == name))
                for name in names]
      axis.bar(np.arange(len(names)) + index * width, errors, width,
               label=dataset)
    axis.set_xticks(np.arange(len(names)) + width * (len(datasets) - 1) / 2)
    axis.set_xticklabels(names)
    axis.set_ylabel('test error %')
    axis.set_title(f"same network and budget ({accuracy[0]['checkpoint_step']}"
                   ' steps)', fontsize=9)
  for axis in axes:
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=7)
  figure.suptitle('capsjax.routing algorithms', fontsize=9)
  common.save_figure(figure, path)


def merge(paths: Sequence[str]) -> dict[str, Any]:
  """One report of several: each one's cost and accuracy rows, its settings
  and machine kept per part."""
  reports = []
  for path in paths:
    try:
      report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
      raise SystemExit(f'--merge {path}: {error}') from error
    if report.get('benchmark') != 'routing_algorithms':
      raise SystemExit(f'--merge {path}: not a routing_algorithms report')
    reports.append(report)
  parts = {'cost': [r for r in reports if r['cost']],
           'accuracy': [r for r in reports if r['accuracy']]}
  return {
      'benchmark': 'routing_algorithms',
      'merged_from': [str(path) for path in paths],
      'settings': {part: [r['settings'] for r in chosen]
                   for part, chosen in parts.items()},
      'cost': [row for r in parts['cost'] for row in r['cost']],
      'accuracy': [row for r in parts['accuracy'] for row in r['accuracy']],
      'machine': {part: [r['machine'] for r in chosen]
                  for part, chosen in parts.items()},
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.merge:
    report = merge(args.merge)
    print_tables(report['cost'], report['accuracy'])
    if args.out:
      common.write_json(args.out, report)
    if args.plot:
      settings = (report['settings']['cost'] or [{'shape': MNIST_SHAPE}])[0]
      plot(args.plot, report['cost'], report['accuracy'], settings)
    return report
  machine = common.machine_info()
  print(f'machine: {common.describe_machine(machine)}', flush=True)
  settings = {
      'algorithms': args.algorithms, 'iterations': args.iterations,
      'shape': list(args.shape), 'repeats': args.repeats,
      'warmup': args.warmup, 'cost': not args.no_cost,
      'accuracy': args.accuracy, 'datasets': args.datasets,
      'train_iterations': args.train_iterations,
      'batch_size': args.batch_size, **common.training_budget(args),
      'routing_loss': 'sum of squared output poses + sum of output '
                      'activations, gradient w.r.t. the votes (and EM\'s '
                      'input activations)',
  }
  cost = [] if args.no_cost else cost_rows(args)
  accuracy = []
  if args.accuracy:
    with tempfile.TemporaryDirectory(prefix='capsjax_routing_') as temporary:
      accuracy = accuracy_rows(args, Path(args.workdir or temporary))
  machine['loadavg_end'] = list(os.getloadavg())
  print()
  print_tables(cost, accuracy)
  report = {'benchmark': 'routing_algorithms', 'settings': settings,
            'cost': cost, 'accuracy': accuracy, 'machine': machine}
  if args.out:
    common.write_json(args.out, report)
  if args.plot:
    plot(args.plot, cost, accuracy, settings)
  return report


if __name__ == '__main__':
  main()
