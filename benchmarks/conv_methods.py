"""Each convolution of the models, by each method, and what 'auto' picks.

    python benchmarks/conv_methods.py [--repeats 7] [--out FILE.json]
        [--methods patches,fourier] [--shapes 'LeNet-5 conv1,...'] [--small]
        [--steps lenet5,efficient_capsnet] [--step-repeats 30]

Times forward + backward (the gradient of a sum of squares with respect to
both the images and the kernel, jitted) of every convolution shape in the
models of this project (`SHAPES`: CapsNet conv1 and PrimaryCaps, the
baseline CNN's, LeNet-5's, Efficient-CapsNet's), by each of `--methods`,
all compiled first and then timed in alternation, `--repeats` rounds, so
that drifts of the machine's speed fall on every method alike (`--small`:
batch 2 everywhere, a smoke test). For each
shape it prints the median times, their ratio, the Fourier method's
product ratio (`capsjax.convolution.fourier_product_ratio`) and what
`capsjax.convolution.resolve_method('auto', ...)` picks on this platform.

Single convolutions are not whole steps: the layout of a convolution's
output and what XLA fuses around it differ inside a model (the comment on
`resolve_method`'s constants says where the two disagree). `--steps` also
times whole training steps (train/configs/<model>.py at its own batch
size, random inputs, Adam, as `train_and_evaluate` runs them) with
`config.model.conv_method` 'auto' and each of `--methods` for every layer,
compiled first and timed in alternation, `--step-repeats` rounds of three
steps: 'auto' should be at least as fast as any one method.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

if __package__ in (None, ''):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from capsjax import convolution  # pylint: disable=g-import-not-at-top
from train import input_pipeline  # pylint: disable=g-import-not-at-top

# --steps: model -> its config module in train/configs.
STEP_CONFIGS = {'capsnet': 'default', 'lenet5': 'lenet5',
                'baseline_cnn': 'baseline_cnn',
                'efficient_capsnet': 'efficient_capsnet'}

# (name, images shape NHWC, kernel size, out channels, stride).
SHAPES = (
    ('CapsNet conv1', (128, 28, 28, 1), 9, 256, 1),
    ('CapsNet PrimaryCaps', (128, 20, 20, 256), 9, 256, 2),
    ('baseline CNN conv1', (128, 32, 32, 1), 5, 256, 1),
    ('baseline CNN conv2', (128, 32, 32, 256), 5, 256, 1),
    ('LeNet-5 conv1', (128, 32, 32, 1), 5, 6, 1),
    ('LeNet-5 conv2', (128, 14, 14, 6), 5, 16, 1),
    ('Efficient-CapsNet conv1', (16, 28, 28, 1), 5, 32, 1),
    ('Efficient-CapsNet conv2', (16, 24, 24, 32), 3, 64, 1),
    ('Efficient-CapsNet conv3', (16, 22, 22, 64), 3, 64, 1),
    ('Efficient-CapsNet conv4', (16, 20, 20, 64), 3, 128, 2),
)


def gradient_function(method: str, stride: int):
  def loss(images, kernel):
    return jnp.sum(jnp.square(convolution.conv2d(images, kernel, stride,
                                                 method=method)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def time_steps(models: Sequence[str], methods: Sequence[str], rounds: int,
               small: bool) -> list[dict]:
  """Whole training steps per model and conv method, timed alternately."""
  import importlib  # pylint: disable=g-import-not-at-top
  steps = {}
  for model in models:
    for method in ('auto', *methods):
      config = importlib.import_module(
          f'train.configs.{STEP_CONFIGS[model]}').get_config()
      if small:
        config.batch_size = 2
      config.model.conv_method = method
      image_shape = input_pipeline.image_shape(config)
      batch = common.random_batch(config.batch_size, image_shape)
      state = common.state_for(common.create_state(config, image_shape),
                               config)
      compiled, compile_s = common.compile_train_step(config, state, batch)
      state, _ = compiled(state, batch)
      steps[model, method] = {'call': compiled, 'state': state,
                              'batch': batch, 'times': [],
                              'compile_s': compile_s,
                              'batch_size': config.batch_size}
  for _ in range(rounds):
    for run in steps.values():
      for _ in range(3):
        start = time.perf_counter()
        run['state'], _ = run['call'](run['state'], run['batch'])
        jax.block_until_ready(run['state'])
        run['times'].append(time.perf_counter() - start)
  return [{'model': model, 'conv_method': method,
           'batch_size': run['batch_size'], 'compile_s': run['compile_s'],
           **common.summarize(run['times'])}
          for (model, method), run in steps.items()]


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.make_parser(__doc__)
  parser.add_argument('--repeats', type=int, default=7,
                      help='timed rounds (every shape and method each round)')
  parser.add_argument('--methods', default='patches,fourier',
                      help='comma-separated methods of capsjax.convolution')
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--shapes', default='',
                      help='comma-separated names of SHAPES (default: all)')
  parser.add_argument('--steps', default='',
                      help='comma-separated models whose whole training step '
                      f'to time too: {", ".join(STEP_CONFIGS)}')
  parser.add_argument('--step-repeats', type=int, default=30,
                      help='rounds of three steps per model and method')
  parser.add_argument('--small', action='store_true',
                      help='batch 2 everywhere (a smoke test)')
  common.add_allocator_argument(parser)
  args = parser.parse_args(argv)
  methods = [method for method in args.methods.split(',') if method]
  unknown = [m for m in methods if m not in convolution.METHODS or
             m == 'auto']
  if unknown or not methods:
    parser.error(f'--methods: {", ".join(unknown) or "none"}; choose from '
                 f'{", ".join(m for m in convolution.METHODS if m != "auto")}')
  if args.repeats < 1:
    parser.error(f'--repeats must be >= 1, got {args.repeats}')
  names = [name for name in args.shapes.split(',') if name]
  known = [shape[0] for shape in SHAPES]
  if any(name not in known for name in names):
    parser.error(f'--shapes: {", ".join(n for n in names if n not in known)}'
                 f' unknown; shapes: {", ".join(known)}')
  step_models = [model for model in args.steps.split(',') if model]
  if any(model not in STEP_CONFIGS for model in step_models):
    parser.error(f'--steps must be from {", ".join(STEP_CONFIGS)}')
  machine = common.set_up_machine(args)

  shapes = [(name, (2, *images_shape[1:]) if args.small else images_shape,
             size, out_channels, stride)
            for name, images_shape, size, out_channels, stride in SHAPES
            if not names or name in names]
  calls = {}
  for name, images_shape, size, out_channels, stride in shapes:
    images = common.random_normal(images_shape, seed=0)
    kernel = common.random_normal(
        (size, size, images_shape[-1], out_channels), seed=1, scale=0.1)
    for method in methods:
      compiled, compile_s = common.compile_jitted(
          gradient_function(method, stride), images, kernel)
      jax.block_until_ready(compiled(images, kernel))
      calls[name, method] = (compiled, images, kernel, [], compile_s)
  for _ in range(args.repeats):
    for compiled, images, kernel, times, _ in calls.values():
      start = time.perf_counter()
      jax.block_until_ready(compiled(images, kernel))
      times.append(time.perf_counter() - start)

  results, rows = [], []
  for name, images_shape, size, out_channels, stride in shapes:
    kernel_shape = (size, size, images_shape[-1], out_channels)
    timings = {method: common.summarize(calls[name, method][3])
               for method in methods}
    ratio = convolution.fourier_product_ratio(*images_shape[1:3], size,
                                              stride)
    auto = convolution.resolve_method('auto', None, images_shape,
                                      kernel_shape, stride)
    results.append({'name': name, 'images_shape': list(images_shape),
                    'kernel_shape': list(kernel_shape), 'stride': stride,
                    'fourier_product_ratio': ratio, 'auto': auto,
                    'timings': timings})
    row = [name, f'{size}x{size}/{stride}',
           f'{images_shape[-1]}->{out_channels}']
    row += [common.spread(timings[method]) for method in methods]
    if 'patches' in timings and 'fourier' in timings:
      row.append(f"{timings['patches']['median_s'] / timings['fourier']['median_s']:.2f}")
    row += [f'{ratio:.1f}', auto]
    rows.append(row)
  headers = ['convolution', 'kernel', 'channels',
             *(f'{method} ms' for method in methods)]
  if 'patches' in methods and 'fourier' in methods:
    headers.append('patches / fourier')
  headers += ['product ratio', "'auto'"]
  print(f'\nforward + backward, median of {args.repeats} alternating '
        'rounds (ms, with the inter-quartile range):')
  print(common.format_table(headers, rows))
  step_results = []
  if step_models:
    step_results = time_steps(step_models, methods, args.step_repeats,
                              args.small)
    print(f'\ntraining steps, median of {3 * args.step_repeats} in '
          'alternating rounds (ms, with the inter-quartile range):')
    print(common.format_table(
        ['model', 'batch', 'conv_method', 'step ms', 'compile s'],
        [[r['model'], r['batch_size'], r['conv_method'], common.spread(r),
          f"{r['compile_s']:.1f}"] for r in step_results]))
  if args.out:
    common.write_json(args.out, {'machine': machine, 'repeats': args.repeats,
                                 'small': args.small, 'methods': methods,
                                 'results': results, 'steps': step_results})
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
