"""Medians over repeated benchmark runs, as the README's speed table.

    python benchmarks/summarize.py DIR

reads every `train_step*.json` written by `benchmarks/train_step.py --out`
(and `torch_*.json` of `benchmarks/torch_reference.py --out`) in DIR, groups
the runs by setting (precision, convolution method, allocator) and prints
one Markdown row per setting: the median over runs of each run's median
step time, its range over runs, images/s, and PyTorch's step time measured
in the same runs with the speed ratio. `benchmarks/run_all.sh DIR` writes
such a folder.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


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
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or not Path(argv[0]).is_dir():
    print('usage: python benchmarks/summarize.py DIR', file=sys.stderr)
    return 2
  print(table(Path(argv[0])))
  return 0


if __name__ == '__main__':
  sys.exit(main())
