"""Helpers shared by the benchmarks (routing_iterations.py,
routing_algorithms.py, train_step.py).

One way to do each thing:

- `compile_jitted`: trace, lower and compile a jitted function for concrete
  arguments; the compile time is measured here, never inside a timed step.
- `time_calls` / `summarize`: call a function `warmup` times, then `repeats`
  times (more where a minimum duration asks for it), each call ended by
  `jax.block_until_ready`; report the median, min, max, inter-quartile
  range and mean of the wall-clock times.
- `benchmark`: both of the above plus the compiled program's memory and FLOPs.
- `memory_stats`: peak memory of a compiled program from XLA's
  `compiled.memory_analysis()`: argument + output + temporaries - aliased
  (donated) bytes. On XLA:CPU (jax 0.10.2) the analysis is complete for
  argument, output, alias and temp sizes; its `peak_memory_in_bytes` field is
  only argument + output there (it leaves the temporaries out), so it is
  recorded but not used.
- `flops_of`: `compiled.cost_analysis()['flops']`. XLA counts a while loop's
  body once, not once per trip, so a `fori_loop` (the routing iterations) is
  under-counted; `capsnet_step_flops` is the analytic count to compare with.
- `add_allocator_argument` / `set_up_machine`: `--system-malloc`; by
  default the process reuses freed host memory as `train/main.py` does
  (`train/host_memory.py`), and `ALLOCATOR_ENVIRONMENT` gives a child
  process (the PyTorch reference) the same settings. `set_up_machine` also
  records and prints `machine_info`.
- `machine_info`: CPU model and flags, whether the CPU has bfloat16
  instructions (`cpu_has_bfloat16`), cores, load, the JAX device, library
  versions.
- `write_json`, `format_table`, argument parsers.
- The training-step set-up the scripts time the same way: `make_config`,
  `create_state`, `state_for`, `random_batch`, `benchmark_train_step`.
- Accuracy after a budget: `add_training_budget_arguments`,
  `train_for_accuracy`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `train` is not installed with capsjax.
  sys.path.insert(0, str(REPO_ROOT))

from capsjax import convolution as capsjax_convolution  # pylint: disable=g-import-not-at-top
from train import datasets  # pylint: disable=g-import-not-at-top
from train import hardware  # pylint: disable=g-import-not-at-top
from train import host_memory  # pylint: disable=g-import-not-at-top
from train import models  # pylint: disable=g-import-not-at-top
from train import train as train_lib  # pylint: disable=g-import-not-at-top
from train.configs import default  # pylint: disable=g-import-not-at-top

MNIST_IMAGE_SHAPE = (28, 28, 1)
MB = 1e6  # Memory is reported in MB = 10^6 bytes.

# --small: a tiny CapsNet for smoke tests (same code, far fewer FLOPs and a
# third of the compile time). The config has no kernel-size field, so
# `create_model` clones the model with this one; 3x3 kernels on 28x28 give
# 12x12x4 = 576 primary capsules.
SMALL_MODEL = dict(conv_features=16, primary_capsule_types=4,
                   decoder_hidden_sizes=(16, 32))
SMALL_KERNEL_SIZE = 3


# ---------------------------------------------------------------------------
# Timing.


def compile_jitted(jitted: Any, *args,
                   compiler_options: dict[str, str] | None = None
                   ) -> tuple[Any, float]:
  """(compiled, seconds to trace + lower + compile) of `jitted` for `args`,
  with XLA's `compiler_options` (e.g. {'xla_cpu_...': '...'}) for this
  program only; None: XLA's defaults."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile(compiler_options=compiler_options)
  return compiled, time.perf_counter() - start


def summarize(times: Sequence[float]) -> dict[str, Any]:
  """Median, min, max, IQR (75th - 25th percentile) and mean of `times`."""
  if not times:
    raise ValueError('no times to summarize')
  quartiles = np.percentile(np.asarray(times), [25, 75])
  return {
      'median_s': statistics.median(times),
      'min_s': min(times),
      'max_s': max(times),
      'iqr_s': float(quartiles[1] - quartiles[0]),
      'mean_s': statistics.fmean(times),
      'repeats': len(times),
      'times_s': list(times),
  }


def minor_page_faults() -> int | None:
  """The process's minor page faults so far, or None where the OS does not
  count them."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # Not on Windows.
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1, *,
               min_warmup_s: float = 0.0,
               min_timed_s: float = 0.0) -> dict[str, Any]:
  """Times `call()` (ended by block_until_ready) `repeats` times after
  `warmup` untimed calls; returns `summarize` of the times, plus the minor
  page faults of each timed call (`page_faults`, None where not counted)
  and their median: a call that faults in fresh memory pays for every page
  (host_memory.py), so a step that does so each time shows it here.

  `min_warmup_s` and `min_timed_s` extend the warm-up and the timed calls
  until each has lasted that long in all: a call of a few milliseconds
  needs hundreds of calls before its median settles, where one of half a
  second needs ten.
  """
  if repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {repeats}')
  warmup_start = time.perf_counter()
  calls = 0
  while calls < warmup or (
      calls and time.perf_counter() - warmup_start < min_warmup_s):
    jax.block_until_ready(call())
    calls += 1
  times, faults = [], []
  while len(times) < repeats or sum(times) < min_timed_s:
    faults_before = minor_page_faults()
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
    if faults_before is not None:
      faults.append(minor_page_faults() - faults_before)
  return {**summarize(times), 'page_faults': faults or None,
          'median_page_faults': statistics.median(faults) if faults else None}


def memory_stats(compiled: Any) -> dict[str, float] | None:
  """Peak memory of a compiled program from XLA's memory analysis, in bytes.

  peak_bytes = argument + output - alias + temp: the buffers of the
  arguments and results (an output that reuses a donated argument's buffer
  counted once) plus XLA's temporary allocation, which already is the peak of
  the temporaries live at the same time. Only compilation is needed.
  None if the backend gives no analysis.
  """
  analysis = compiled.memory_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one per program.
    analysis = analysis[0] if analysis else None
  if analysis is None:
    return None
  argument = analysis.argument_size_in_bytes
  output = analysis.output_size_in_bytes
  alias = analysis.alias_size_in_bytes
  temp = analysis.temp_size_in_bytes
  return {
      'peak_bytes': argument + output - alias + temp,
      'argument_bytes': argument,
      'output_bytes': output,
      'alias_bytes': alias,
      'temp_bytes': temp,
      'xla_peak_memory_in_bytes': getattr(analysis, 'peak_memory_in_bytes',
                                          None),
  }


def _cost_of(compiled: Any, key: str) -> float | None:
  """A positive entry of XLA's cost analysis of a compiled program, or
  None if not available."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):  # Older jax: one per program.
    analysis = analysis[0] if analysis else None
  if not analysis or key not in analysis:
    return None
  value = float(analysis[key])
  return value if value > 0 else None


def flops_of(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled program, or None if not available."""
  return _cost_of(compiled, 'flops')


def bytes_accessed_of(compiled: Any) -> float | None:
  """XLA's count of the bytes a compiled program's operations access (each
  operation's output and operands, each once; see
  benchmarks/op_profile.py), or None if not available."""
  return _cost_of(compiled, 'bytes accessed')


TIMING_KEYS = ('median_s', 'min_s', 'max_s', 'iqr_s', 'mean_s', 'repeats',
               'times_s', 'page_faults', 'median_page_faults')


def benchmark(fn: Callable[..., Any], args: tuple, *, repeats: int,
              warmup: int = 1, min_warmup_s: float = 0.0,
              min_timed_s: float = 0.0,
              donate_argnums: tuple[int, ...] = (),
              next_args: Callable[[tuple, Any], tuple] | None = None,
              batch_size: int | None = None,
              return_outputs: bool = False) -> Any:
  """Compiles `jax.jit(fn)` for `args`, then times it.

  Args:
    fn: the function (jitted here; an already jitted one is fine).
    args: its arguments. Donated ones are consumed: pass copies.
    repeats: timed calls; 0 only compiles (the timing fields are None).
    warmup: untimed calls after compilation.
    min_warmup_s, min_timed_s: as `time_calls`.
    donate_argnums: passed to `jax.jit`.
    next_args: `(args, outputs) -> args` of the next call, e.g. to thread a
      train state through the steps; None calls with the same args.
    batch_size: if given, also report images_per_s = batch_size / median.
    return_outputs: also return the outputs of the last call (repeats >= 1).

  Returns:
    `summarize` of the times, plus compile_s, memory (`memory_stats`),
    flops (`flops_of`), bytes_accessed (`bytes_accessed_of`) and
    images_per_s; with `return_outputs`, the pair
    (that, outputs).
  """
  jitted = jax.jit(fn, donate_argnums=donate_argnums)
  compiled, compile_s = compile_jitted(jitted, *args)
  current = {'args': args, 'outputs': None}

  def call():
    outputs = compiled(*current['args'])
    current['outputs'] = outputs
    if next_args is not None:
      current['args'] = next_args(current['args'], outputs)
    return outputs

  if repeats == 0:
    timing = dict.fromkeys(TIMING_KEYS)
  else:
    timing = time_calls(call, repeats, warmup, min_warmup_s=min_warmup_s,
                        min_timed_s=min_timed_s)
  result = {'compile_s': compile_s, **timing,
            'memory': memory_stats(compiled), 'flops': flops_of(compiled),
            'bytes_accessed': bytes_accessed_of(compiled)}
  if batch_size is not None:
    result['images_per_s'] = (None if repeats == 0 else
                              batch_size / result['median_s'])
  return (result, current['outputs']) if return_outputs else result


def benchmark_host(fn: Callable[[int], Any], repeats: int,
                   warmup: int = 1) -> dict[str, Any]:
  """Times a host (numpy) function `fn(i)`, i = 0, 1, ... (no compilation)."""
  counter = iter(range(warmup + repeats))
  return time_calls(lambda: fn(next(counter)), repeats, warmup)


# ---------------------------------------------------------------------------
# The machine.


# The CPU's model and flags, and bfloat16 in hardware: train/hardware.py.
RECORDED_CPU_FLAGS = hardware.RECORDED_CPU_FLAGS
BFLOAT16_CPU_FLAGS = hardware.BFLOAT16_CPU_FLAGS
cpu_has_bfloat16 = hardware.cpu_has_bfloat16


def _memory_total_bytes() -> int | None:
  try:
    for line in Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemTotal:'):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# train/host_memory.py's settings, for a process started with them.
ALLOCATOR_ENVIRONMENT = {
    'MALLOC_ARENA_MAX': '1',
    'MALLOC_MMAP_MAX_': '0',
    'MALLOC_TRIM_THRESHOLD_': str(host_memory.NO_TRIM),
}


def add_conv_method_argument(parser) -> None:
  parser.add_argument(
      '--conv-method', default='auto', choices=capsjax_convolution.METHODS,
      help="config.model.conv_method: 'auto' (on the CPU Fourier where "
      "capsjax.convolution.resolve_method finds it faster, else patches; "
      "lax off the CPU), 'patches', 'fourier' or 'lax'")


def make_parser(doc: str) -> argparse.ArgumentParser:
  """A parser whose help is a script's docstring: its first line, then the
  rest after the blank line as the epilogue."""
  return argparse.ArgumentParser(
      description=doc.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=doc.split('\n', 2)[2])


def add_allocator_argument(parser) -> None:
  parser.add_argument(
      '--system-malloc', action='store_true',
      help="keep glibc's default malloc settings; by default freed host "
      'memory is reused, as train/main.py does (see train/host_memory.py)')


def set_up_machine(args) -> dict[str, Any]:
  """Before any computation: the allocator as `--system-malloc` says, then
  `machine_info` with whether freed host memory is reused, printed."""
  reuse_freed_host_memory = ((not args.system_malloc)
                             and host_memory.reuse_freed_host_memory())
  machine = machine_info()
  machine['reuse_freed_host_memory'] = reuse_freed_host_memory
  print(f'machine: {describe_machine(machine)}', flush=True)
  return machine


def machine_info() -> dict[str, Any]:
  """What the numbers were measured on."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  cpu = hardware.cpuinfo()
  device = jax.devices()[0]
  return {
      'cpu_model': cpu.get('cpu_model', platform.processor() or 'unknown'),
      'cpu_family': cpu.get('cpu_family'),
      'cpu_model_number': cpu.get('cpu_model_number'),
      'cpu_stepping': cpu.get('cpu_stepping'),
      'cpu_flags': cpu.get('flags', []),
      'cpu_bfloat16': cpu_has_bfloat16(),
      'cpu_count': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)),
      'memory_total_bytes': _memory_total_bytes(),
      'loadavg': list(os.getloadavg()),
      'platform': platform.platform(),
      'python': sys.version.split()[0],
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'numpy': np.__version__,
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'devices': [str(device) for device in jax.devices()],
      # XLA's flags change which kernels run (e.g. YNNPACK or oneDNN for
      # the products on the CPU): a figure is of its flags.
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def describe_machine(machine: dict[str, Any]) -> str:
  allocator = {True: ', freed host memory reused',
               False: ", glibc's default malloc"}.get(
                   machine.get('reuse_freed_host_memory'), '')
  flags = ' '.join(machine['cpu_flags']) or 'none of ' + ' '.join(
      sorted(RECORDED_CPU_FLAGS))
  xla_flags = machine.get('xla_flags')
  xla_flags = f', XLA_FLAGS={xla_flags}' if xla_flags else ''
  return (f"{hardware.describe_cpu(machine)} (flags: {flags}), "
          f"{machine['cpus_usable']} usable cores, "
          f"jax {machine['jax']} / jaxlib {machine['jaxlib']} on "
          f"{machine['backend']} ({machine['device_kind']}){allocator}"
          f'{xla_flags}')


# ---------------------------------------------------------------------------
# Output.


def _to_json(value: Any) -> Any:
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if isinstance(value, Path):
    return str(value)
  raise TypeError(f'cannot write {type(value).__name__} to JSON')


def write_json(path: str | os.PathLike, data: Any) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=2, default=_to_json) + '\n')
  print(f'wrote {path}')


def save_figure(figure, path: str | os.PathLike) -> None:
  """Lays out, writes (as PNG at 110 dpi) and closes a matplotlib figure."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
  print(f'wrote {path}')


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A plain-text table, columns right-aligned."""
  text_rows = [[str(cell) for cell in row] for row in rows]
  widths = [max([len(header)] + [len(row[i]) for row in text_rows])
            for i, header in enumerate(headers)]
  lines = ['  '.join(h.rjust(w) for h, w in zip(headers, widths)),
           '  '.join('-' * w for w in widths)]
  lines += ['  '.join(c.rjust(w) for c, w in zip(row, widths))
            for row in text_rows]
  return '\n'.join(lines)


def ms(seconds: float | None) -> str:
  return '-' if seconds is None else f'{1e3 * seconds:.2f}'


def spread(timing: dict[str, Any], scale: float = 1e3) -> str:
  """'median (IQR)' in ms (scale 1e3) or s (scale 1)."""
  digits = 2 if scale == 1e3 else 3
  return (f"{scale * timing['median_s']:.{digits}f} "
          f"({scale * timing['iqr_s']:.{digits}f})")


def format_mb(megabytes_: float) -> str:
  return f'{megabytes_:.1f}' if abs(megabytes_) >= 10 else f'{megabytes_:.3f}'


def megabytes(memory: dict[str, Any] | None) -> str:
  """The peak of a `memory_stats` result in MB, '-' if there is none."""
  return '-' if memory is None else format_mb(memory['peak_bytes'] / MB)


def parse_int_list(text: str) -> list[int]:
  try:
    values = [int(part) for part in text.split(',') if part.strip()]
  except ValueError as error:
    raise ValueError(f'expected comma-separated integers, got {text!r}'
                     ) from error
  if not values:
    raise ValueError(f'expected comma-separated integers, got {text!r}')
  return values


def parse_bool_list(text: str) -> list[bool]:
  mapping = {'true': True, 'false': False, '1': True, '0': False}
  values = [part.strip().lower() for part in text.split(',') if part.strip()]
  if not values or any(value not in mapping for value in values):
    raise ValueError(f'expected comma-separated true/false, got {text!r}')
  return [mapping[value] for value in values]


# ---------------------------------------------------------------------------
# The training step (train.train.train_step), set up the same way everywhere.


def make_config(*, batch_size: int = 128, precision: str = 'float32',
                routing_iterations: int = 3,
                stop_gradient_intermediate: bool = False,
                small: bool = False, conv_method: str = 'auto'):
  """train/configs/default.py with the benchmark's settings."""
  config = default.get_config()
  config.model.conv_method = conv_method
  config.batch_size = batch_size
  config.precision = precision
  config.model.routing_iterations = routing_iterations
  config.model.stop_gradient_intermediate = stop_gradient_intermediate
  if small:
    for field, value in SMALL_MODEL.items():
      config.model[field] = value
    config.model.kernel_size = SMALL_KERNEL_SIZE
  return config


def create_model(config):
  """train.train.create_model, with the kernel size of a --small config."""
  model = models.create_model(config)
  kernel_size = config.model.get('kernel_size')
  if kernel_size is not None and kernel_size != model.kernel_size:
    model = model.clone(kernel_size=kernel_size)
  return model


_STATES: dict[tuple[str, tuple[int, ...]], Any] = {}


def create_state(config, image_shape=MNIST_IMAGE_SHAPE):
  """train.train.create_train_state(config), jitted as train_and_evaluate
  does (eagerly it takes ~20 s on 2 cores, op by op), made once a process.

  A --small config (with a kernel size) does what create_train_state does
  with `create_model`'s model: the same initialisation and optimizer.
  Never donate the result: use `state_for`.
  """
  key = (config.to_json_best_effort(), tuple(image_shape))
  if key not in _STATES:
    if config.model.get('kernel_size') is None:
      make = functools.partial(train_lib.create_train_state, config,
                               tuple(image_shape))
    else:
      make = functools.partial(_create_state_with, create_model(config),
                               config, tuple(image_shape))
    _STATES[key] = jax.block_until_ready(jax.jit(make)())
  return _STATES[key]


def _create_state_with(model, config, image_shape):
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  images = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(jax.random.key(config.seed), images,
                      jnp.zeros((1,), jnp.int32))['params']
  return train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.adam(train_lib.learning_rate_schedule(config)))


def state_for(base_state, config):
  """A fresh copy of `base_state` whose model follows `config`.

  Routing iterations, the gradient mode and the precision change the
  computation, not the parameters: `create_train_state(config)` gives the
  same parameters and optimizer for every value of them (same seed and
  shapes), only its apply_fn differs. Copying the arrays lets a donated step
  consume them while `base_state` stays usable.
  """
  state = jax.tree.map(lambda x: jax.device_put(x, may_alias=False),
                       base_state)
  return state.replace(apply_fn=create_model(config).apply)


def random_normal(shape: Sequence[int], seed: int, dtype=jnp.float32,
                  scale: float = 1.0) -> jax.Array:
  """Standard normal values made with numpy (nothing to compile)."""
  values = np.random.default_rng(seed).standard_normal(tuple(shape),
                                                       np.float32)
  return jnp.asarray(scale * values, dtype)


def random_batch(batch_size: int, image_shape=MNIST_IMAGE_SHAPE,
                 seed: int = 1) -> dict[str, jax.Array]:
  """Images uniform in [0, 1) and random labels (timing does not depend on
  the pixel values)."""
  rng = np.random.default_rng(seed)
  return {
      'image': jnp.asarray(
          rng.random((batch_size, *image_shape), dtype=np.float32)),
      'label': jnp.asarray(
          rng.integers(0, datasets.NUM_CLASSES, batch_size, dtype=np.int32)),
  }


def compile_train_step(config, state, batch: dict[str, jax.Array],
                       compiler_options: dict[str, str] | None = None
                       ) -> tuple[Any, float]:
  """(compiled, seconds to compile) of `train.train.train_step` jitted as
  train_and_evaluate jits it: the state (argument 0) donated
  (`compiler_options`: see `compile_jitted`)."""
  step = jax.jit(functools.partial(train_lib.train_step, config=config),
                 donate_argnums=0)
  return compile_jitted(step, state, batch, compiler_options=compiler_options)


def benchmark_train_step(config, state, batch: dict[str, jax.Array], *,
                         repeats: int, warmup: int, min_warmup_s: float = 0.0,
                         min_timed_s: float = 0.0) -> dict[str, Any]:
  """Times `train.train.train_step` as train_and_evaluate runs it: jitted
  with the state donated, the state threaded from step to step (`state` is
  consumed); durations as `time_calls`. repeats = 0 only compiles."""
  return benchmark(
      functools.partial(train_lib.train_step, config=config),
      (state, batch),
      repeats=repeats,
      warmup=warmup,
      min_warmup_s=min_warmup_s,
      min_timed_s=min_timed_s,
      donate_argnums=(0,),
      next_args=lambda args, outputs: (outputs[0], args[1]),
      batch_size=config.batch_size,
  )


# ---------------------------------------------------------------------------
# Accuracy after a training budget (train.train.train_and_evaluate).


def add_training_budget_arguments(parser) -> None:
  """The flags of a benchmark's accuracy runs: budget, data, workdir."""
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--max-steps', type=int, default=-1,
                      help='stop each training after this many steps')
  parser.add_argument('--train-examples', type=int, default=-1,
                      help='use only the first N training examples (-1: all)')
  parser.add_argument('--eval-examples', type=int, default=-1,
                      help='use only the first N validation and test '
                      'examples (-1: all)')
  parser.add_argument('--data-dir', default='',
                      help="config.data_dir ('' = ../shared/data beside the "
                      'repository)')
  parser.add_argument('--tfds-data-dir', default=None,
                      help='config.tfds_data_dir (default: the config\'s)')
  parser.add_argument('--workdir', default=None,
                      help='where the accuracy runs keep checkpoints (one '
                      'subfolder per run; an existing one is resumed); '
                      'default: a temporary folder, deleted afterwards')


def check_training_budget(parser, args, accuracy: bool) -> None:
  if accuracy and args.epochs < 1 and args.max_steps < 1:
    parser.error('--accuracy needs --epochs >= 1 or --max-steps >= 1')


def training_budget(args) -> dict[str, Any]:
  """The budget flags, for a report's settings."""
  return {'epochs': args.epochs, 'max_steps': args.max_steps,
          'train_examples': args.train_examples,
          'eval_examples': args.eval_examples}


def apply_training_budget(config, args) -> None:
  """Sets `config` to the budget and data of `args` (as
  `add_training_budget_arguments` defines them)."""
  config.num_epochs = args.epochs
  config.max_steps = args.max_steps
  config.num_train_examples = args.train_examples
  config.num_eval_examples = args.eval_examples
  config.data_dir = args.data_dir
  if args.tfds_data_dir:
    config.tfds_data_dir = args.tfds_data_dir
  config.num_reconstructions = 0
  config.keep_checkpoints = 1
  config.checkpoint_every_steps = 1 << 30  # only at the end of each epoch


def train_for_accuracy(config, args, run_dir: Path) -> dict[str, Any]:
  """Trains `config` within the budget of `args` into `run_dir` (resumed if
  it exists); the best-on-validation checkpoint's accuracies and the wall
  time."""
  apply_training_budget(config, args)
  start = time.perf_counter()
  results = train_lib.train_and_evaluate(config, str(run_dir))
  return {
      'validation_accuracy': results['validation_accuracy'],
      'test_accuracy': results['test_accuracy'],
      'test_examples': results['test_examples'],
      'checkpoint_step': results['checkpoint_step'],
      **training_budget(args),
      'wall_s': time.perf_counter() - start,
  }


def capsnet_step_flops(config, batch_size: int,
                       image_shape=MNIST_IMAGE_SHAPE) -> float:
  """Analytic FLOPs of one CapsNet training step (matmul-like work only).

  2 FLOPs per multiply-add in the convolutions, prediction vectors, routing
  contractions and decoder; the backward pass costs twice the forward (input
  and weight gradients) except conv1, whose input needs no gradient, and
  the routing iterations before the last when their gradient is stopped.
  Elementwise work (squash, softmax, losses, Adam) is left out.
  """
  kernel_size = create_model(config).kernel_size
  model = config.model
  height, width, channels = image_shape
  h1 = height - kernel_size + 1
  w1 = width - kernel_size + 1
  h2 = (h1 - kernel_size) // 2 + 1
  w2 = (w1 - kernel_size) // 2 + 1
  primary_channels = model.primary_capsule_types * model.primary_capsule_dim
  in_capsules = h2 * w2 * model.primary_capsule_types
  out_capsules, out_dim = datasets.NUM_CLASSES, model.class_capsule_dim
  conv1 = 2 * h1 * w1 * kernel_size**2 * channels * model.conv_features
  primary = (2 * h2 * w2 * kernel_size**2 * model.conv_features
             * primary_channels)
  u_hat = 2 * in_capsules * out_capsules * model.primary_capsule_dim * out_dim
  # Per iteration: s = sum_i c u_hat; all but the last also the agreement.
  # With the stopped gradient only the last iteration has a backward pass.
  contraction = 2 * in_capsules * out_capsules * out_dim
  routing = contraction * (2 * model.routing_iterations - 1)
  routing_backward = 2 * (contraction if model.stop_gradient_intermediate
                          else routing)
  decoder = 0
  if config.reconstruction_weight > 0:
    sizes = [out_capsules * out_dim, *model.decoder_hidden_sizes,
             math.prod(image_shape)]
    decoder = sum(2 * a * b for a, b in zip(sizes, sizes[1:]))
  layers = conv1 + primary + u_hat + decoder
  return float(batch_size * (3 * layers - conv1 + routing + routing_backward))
