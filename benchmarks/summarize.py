"""The speed doc's tables from one folder of benchmark output.

    python benchmarks/summarize.py DIR

reads every `train_step*.json` written by `benchmarks/train_step.py --out`
(and `torch_*.json` of `benchmarks/torch_reference.py --out`) in DIR, groups
the runs by setting (precision, convolution method, allocator) and prints
one Markdown row per setting: the median over runs of each run's median
step time, its range over runs, images/s, and PyTorch's step time measured
in the same runs with the speed ratio; then, per run, the ratios measured
side by side (JAX vs PyTorch, executed FLOPs vs the same run's plain dot
rate, XLA's bytes accessed vs the same run's streaming rate); evaluation
against training, alternating in one process (`--evaluation`); the other
experiments' steps; the peak memory per routing iteration count
(`routing_iterations.json`); whole steps by convolution method
(`conv_methods.json`); and the machine (CPU model and flags, device) of
every run. `benchmarks/run_all.sh DIR` writes such a folder.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `train` is not installed with capsjax.
  sys.path.insert(0, str(REPO_ROOT))

from train import hardware  # pylint: disable=g-import-not-at-top


def _setting(report: dict[str, Any], precision: str) -> tuple[str, str, str]:
  settings = report['settings']
  allocator = ('freed memory reused'
               if settings.get('reuse_freed_host_memory', False)
               else 'glibc default')
  return precision, settings.get('conv_method', 'patches'), allocator


def _spread(values: list[float]) -> str:
  median = statistics.median(values)
  if len(values) == 1:
    return f'{median:.2f} s (1 run)'
  return (f'{median:.2f} s ({min(values):.2f}-{max(values):.2f}, '
          f'{len(values)} runs)')


def collect(directory: Path) -> dict[tuple[str, str, str], dict[str, list]]:
  """Per setting: the run medians of JAX and of PyTorch."""
  groups: dict[tuple[str, str, str], dict[str, list]] = {}
  for path in sorted(directory.glob('train_step*.json')):
    report = json.loads(path.read_text())
    for precision, result in report['results'].items():
      group = groups.setdefault(_setting(report, precision),
                                {'jax': [], 'torch': [], 'batch': []})
      group['jax'].append(result['median_step_s'])
      group['batch'].append(report['settings']['batch_size'])
      torch_result = ((report.get('torch') or {}).get('results') or {}
                      ).get(precision)
      if torch_result:
        group['torch'].append(torch_result['median_step_s'])
  return groups


def torch_only(directory: Path) -> dict[str, list[float]]:
  """Run medians of standalone PyTorch reports, per precision."""
  found: dict[str, list[float]] = {}
  for path in sorted(directory.glob('torch_*.json')):
    for precision, result in json.loads(path.read_text())['results'].items():
      found.setdefault(precision, []).append(result['median_step_s'])
  return found


def table(directory: Path) -> str:
  groups = collect(directory)
  standalone = torch_only(directory)
  lines = ['| precision | convolution | host allocator | JAX step, median '
           '(range) | images/s | PyTorch step, same runs | JAX speed-up |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for (precision, method, allocator), group in groups.items():
    jax_median = statistics.median(group['jax'])
    torch_times = group['torch']
    torch_cell, ratio = '-', '-'
    if not torch_times and precision in standalone:
      torch_times = standalone[precision]
      torch_cell = _spread(torch_times) + ', separate run'
    elif torch_times:
      torch_cell = _spread(torch_times)
    if torch_times:
      ratio = f'{statistics.median(torch_times) / jax_median:.2f}x'
    lines.append(
        f"| {precision} | {method} | {allocator} | {_spread(group['jax'])} "
        f"| {statistics.median(group['batch']) / jax_median:.1f} "
        f'| {torch_cell} | {ratio} |')
  return '\n'.join(lines) if len(lines) > 2 else ''


def _reports(directory: Path) -> list[tuple[str, dict[str, Any]]]:
  return [(path.name, json.loads(path.read_text()))
          for path in sorted(directory.glob('train_step*.json'))]


def machines(directory: Path) -> str:
  """One line per distinct machine of the folder's reports."""
  seen = {}
  paths = sorted(directory.glob('*.json'))
  for path in paths:
    machine = json.loads(path.read_text()).get('machine')
    if not machine:
      continue
    line = (f"{hardware.describe_cpu(machine)}; CPU flags: "
            f"{' '.join(machine.get('cpu_flags', [])) or '-'}; bfloat16 "
            f"instructions: {machine.get('cpu_bfloat16', 'unknown')}; "
            f"{machine.get('cpus_usable', '?')} usable cores; device: "
            f"{machine.get('device_kind', machine.get('backend'))}; jax "
            f"{machine['jax']}")
    if machine.get('xla_flags'):
      line += f"; XLA_FLAGS={machine['xla_flags']}"
    seen.setdefault(line, []).append(path.name)
  return '\n'.join(f'- {line} ({", ".join(names)})'
                   for line, names in seen.items())


def side_by_side(directory: Path) -> str:
  """Per run and precision: the ratios measured in that run."""
  lines = ['| run | precision | JAX step s | PyTorch step s | JAX speed-up | '
           'plain dot GFLOP/s | executed GFLOP/step | executed FLOPs of the '
           'dot rate | streaming GB/s | GB accessed/step | bytes accessed '
           'at the streaming rate, of the step | skipped |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- '
           '| --- |']
  for name, report in _reports(directory):
    skipped = '; '.join(f'{p}: not timed (no bfloat16 instructions)'
                        for p in (report.get('skipped') or {}))
    ratios = report.get('speed_ratios') or {}
    for precision, result in report['results'].items():
      ratio = ratios.get(precision)
      executed = result.get('executed_fraction_of_matmul_peak')
      lines.append(
          f"| {name} | {precision} | {result['median_step_s']:.3f} | "
          f"{ratio['torch_median_step_s']:.3f} | "
          f"{ratio['jax_speedup']:.2f}x | " if ratio else
          f"| {name} | {precision} | {result['median_step_s']:.3f} | - | - | ")
      # Reports from before the memory traffic was recorded have none.
      stream = (result.get('stream') or {}).get('bytes_per_s')
      accessed = result.get('bytes_accessed')
      traffic = result.get('bytes_at_stream_rate_fraction')
      lines[-1] += (
          f"{result['matmul']['flops_per_s'] / 1e9:.0f} | "
          f"{(result.get('flops_executed') or 0) / 1e9:.1f} | "
          f"{'-' if executed is None else f'{100 * executed:.0f}%'} | "
          f"{'-' if stream is None else f'{stream / 1e9:.1f}'} | "
          f"{'-' if accessed is None else f'{accessed / 1e9:.2f}'} | "
          f"{'-' if traffic is None else f'{100 * traffic:.0f}%'} | "
          f"{skipped or '-'} |")
  return '\n'.join(lines) if len(lines) > 2 else ''


def _per_run_table(directory: Path, columns: list[str], key: str,
                   cells) -> str:
  """One Markdown row per run and entry of its report's `key` dict: the
  run, the entry's name, then `cells(entry)`; '' when no run has any."""
  lines = ['| ' + ' | '.join(['run', *columns]) + ' |',
           '| --- |' + ' --- |' * len(columns)]
  for name, report in _reports(directory):
    for label, result in (report.get(key) or {}).items():
      lines.append('| ' + ' | '.join([name, label, *cells(result)]) + ' |')
  return '\n'.join(lines) if len(lines) > 2 else ''


def evaluation(directory: Path) -> str:
  """Per run and precision: evaluation's images/s over training's, from
  rounds alternating the two in that run (`train_step.py --evaluation`)."""
  return _per_run_table(
      directory,
      ['precision', 'evaluation images/s', 'training images/s',
       'evaluation / training (median of rounds)', 'range over rounds'],
      'evaluation',
      lambda result: [
          f"{result['eval_images_per_s']:.1f}",
          f"{result['train_images_per_s']:.1f}",
          f"{result['median_ratio']:.2f}x",
          f"{min(result['ratios']):.2f}-{max(result['ratios']):.2f} "
          f"({len(result['ratios'])} rounds)"])


def compiler_options(directory: Path) -> str:
  """Per report, precision and variant: the step compiled with XLA's
  defaults and with each `--compiler-option`, timed alternately in that
  process (`train_step.py --compiler-option`, `xla_options.json`)."""
  lines = ['| report | precision | compiled with | median step s | '
           'time / defaults (median of rounds) |',
           '| --- | --- | --- | --- | --- |']
  for path in sorted(directory.glob('*.json')):
    report = json.loads(path.read_text())
    for precision, result in (report.get('compiler_options') or {}).items():
      for variant in result['variants']:
        lines.append(
            f"| {path.name} | {precision} | {variant['label']} | "
            f"{variant['median_step_s']:.3f} | "
            f"{variant['median_ratio_to_defaults']:.3f} "
            f"({result['rounds']} rounds) |")
  return '\n'.join(lines) if len(lines) > 2 else ''


def experiments(directory: Path) -> str:
  return _per_run_table(
      directory,
      ['experiment', 'input', 'step s', 'images/s', 'executed GFLOP',
       'predicted from the MNIST step s', 'measured / predicted'],
      'experiments',
      lambda result: [
          'x'.join(map(str, result['image_shape'])),
          f"{result['median_step_s']:.3f}", f"{result['images_per_s']:.1f}",
          f"{(result['flops_executed'] or 0) / 1e9:.2f}",
          f"{result.get('predicted_step_s', float('nan')):.3f}",
          f"{result.get('slowdown', float('nan')):.2f}"])


def routing_memory(directory: Path) -> str:
  path = directory / 'routing_iterations.json'
  if not path.is_file():
    return ''
  rows = json.loads(path.read_text())['results']
  lines = ['| r | gradient | routing fwd+bwd peak MB | whole step peak MB | '
           'whole step s |', '| --- | --- | --- | --- | --- |']
  for row in rows:
    step = row.get('train_step') or {}
    memory = (step.get('memory') or {}).get('peak_bytes')
    routing = row['routing_forward_backward']['memory']
    routing_mb = '-' if not routing else f"{routing['peak_bytes'] / 1e6:.1f}"
    step_mb = '-' if memory is None else f'{memory / 1e6:.1f}'
    step_s = ('-' if step.get('median_s') is None
              else f"{step['median_s']:.3f}")
    gradient = 'stopped' if row['stop_gradient_intermediate'] else 'full'
    lines.append(f"| {row['iterations']} | {gradient} | {routing_mb} | "
                 f'{step_mb} | {step_s} |')
  return '\n'.join(lines)


def conv_method_steps(directory: Path) -> str:
  """Whole steps by conv method (`conv_methods.json`), one row a model."""
  path = directory / 'conv_methods.json'
  if not path.is_file():
    return ''
  steps = json.loads(path.read_text()).get('steps') or []
  methods = list(dict.fromkeys(step['conv_method'] for step in steps))
  by_model = {}
  for step in steps:
    by_model.setdefault((step['model'], step['batch_size']), {})[
        step['conv_method']] = step
  lines = ['| step (batch) | ' + ' | '.join(
      f"'{method}' ms (IQR)" for method in methods) + ' |',
           '| --- |' + ' --- |' * len(methods)]
  for (model, batch_size), by_method in by_model.items():
    lines.append(f'| {model} ({batch_size}) | ' + ' | '.join(
        f"{1e3 * by_method[m]['median_s']:.1f} "
        f"({1e3 * by_method[m]['iqr_s']:.1f})" if m in by_method else '-'
        for m in methods) + ' |')
  return '\n'.join(lines) if by_model else ''


def summary(directory: Path) -> str:
  sections = [('Machines', machines(directory)),
              ('Training step, medians over runs', table(directory)),
              ('Ratios measured side by side, per run', side_by_side(directory)),
              ('Evaluation against training, per run',
               evaluation(directory)),
              ('Other experiments (float32)', experiments(directory)),
              ('XLA compiler options, alternating in one process',
               compiler_options(directory)),
              ('Peak memory per routing iteration count',
               routing_memory(directory)),
              ('Training steps by convolution method',
               conv_method_steps(directory))]
  return '\n\n'.join(f'### {title}\n\n{body}' for title, body in sections
                      if body)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or not Path(argv[0]).is_dir():
    print('usage: python benchmarks/summarize.py DIR', file=sys.stderr)
    return 2
  print(summary(Path(argv[0])))
  return 0


if __name__ == '__main__':
  sys.exit(main())
