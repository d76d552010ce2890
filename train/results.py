"""The results table: trained workdirs beside the paper's numbers.

    python -m train.results --workdirs=DIR1,DIR2,... \
        [--robustness=OUT1/robustness.json,...] [--out=results.md]

For each workdir (a finished `python -m train.main` run) it reads
`config.json`, `metrics.jsonl` and `test_results.json` and prints one
Markdown row: the model and its settings, how long it trained (steps,
epochs, wall time of the epochs as `metrics.jsonl` records them, evaluation
included, compilation and the final test not), validation and test accuracy
of the best checkpoint on validation, and the paper's figure for the same
row (`PAPER`, from Sabour et al. 2017, tables 1 and section 5-6). With
`--robustness` (the JSON written by `python -m train.robustness`), also the
accuracy on the test set rotated by 0 and +-35 degrees, the worst angle of
the sweep, and the affine set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from train import input_pipeline

# (dataset, model, routing iterations or None, with reconstruction) ->
# the paper's test error (MultiMNIST: both digits right), or for affNIST
# its test accuracy.
PAPER = {
    ('mnist', 'baseline_cnn', None, False): '0.39% error',
    ('mnist', 'capsnet', 1, False): '0.34% error',
    ('mnist', 'capsnet', 1, True): '0.29% error',
    ('mnist', 'capsnet', 3, False): '0.35% error',
    ('mnist', 'capsnet', 3, True): '0.25% error',
    ('multimnist', 'baseline_cnn', None, False): '8.1% error',
    ('multimnist', 'capsnet', 1, True): '7.5% error',
    ('multimnist', 'capsnet', 3, True): '5.2% error',
    ('affnist', 'baseline_cnn', None, False): '66% affNIST accuracy',
    ('affnist', 'capsnet', 3, True): '79% affNIST accuracy',
}


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


def describe_run(workdir: str | Path) -> dict[str, Any]:
  """What a finished workdir trained, for how long, and how well."""
  workdir = Path(workdir)
  for name in ('config.json', 'test_results.json'):
    if not (workdir / name).exists():
      raise FileNotFoundError(f'{workdir}: no {name} (not a finished '
                              'python -m train.main run)')
  config = json.loads((workdir / 'config.json').read_text())
  test = json.loads((workdir / 'test_results.json').read_text())
  epochs = [record for record in _read_json_lines(workdir / 'metrics.jsonl')
            if record.get('kind') == 'epoch']
  model = config['model'].get('name', 'capsnet')
  capsnet = model == 'capsnet'
  reconstruction = capsnet and config['reconstruction_weight'] > 0
  iterations = config['model']['routing_iterations'] if capsnet else None
  steps = max([record['step'] for record in epochs] or [0])
  num_train = input_pipeline.num_train_examples(
      ml_collections.ConfigDict(config))
  return {
      'name': workdir.name,
      'dataset': config['dataset'],
      'model': model,
      'routing_iterations': iterations,
      'reconstruction': reconstruction,
      'precision': config.get('precision', 'float32'),
      'steps': steps,
      'epochs': steps * config['batch_size'] / num_train,
      'wall_s': sum(record['seconds'] for record in epochs),
      'validation_accuracy': test['validation_accuracy'],
      'test_accuracy': test['test_accuracy'],
      'test_examples': test['test_examples'],
      'paper': PAPER.get((config['dataset'], model, iterations,
                          reconstruction), '-'),
  }


def _percent(value: float | None) -> str:
  return '-' if value is None else f'{100 * value:.2f}%'


def robustness_columns(result: dict[str, Any] | None) -> list[str]:
  """Accuracy at 0, -35 and +35 degrees, the worst angle, and affine."""
  if result is None:
    return ['-'] * 4
  by_angle = dict(zip(result['angles'], result['accuracy']))
  worst_angle = min(by_angle, key=by_angle.get)
  at_35 = [by_angle.get(-35.0), by_angle.get(35.0)]
  return [
      _percent(by_angle.get(0.0)),
      ' / '.join(_percent(value) for value in at_35),
      f'{_percent(by_angle[worst_angle])} at {worst_angle:+.0f}',
      _percent(result.get('affine_accuracy')),
  ]


def table(runs: Sequence[dict[str, Any]],
          robustness: dict[str, dict[str, Any]] | None = None) -> str:
  """A Markdown table, one row per run. `robustness`: robustness.json's
  results keyed by workdir path (or name)."""
  header = ['run', 'model', 'precision', 'steps (epochs)', 'train wall time',
            'val. acc.', 'test error', 'paper']
  if robustness is not None:
    header += ['rotated 0', 'rotated -35 / +35', 'worst rotation',
               'affine']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + ' --- |' * len(header)]
  for run in runs:
    if run['model'] == 'capsnet':
      model = (f"CapsNet r={run['routing_iterations']}, "
               f"{'with' if run['reconstruction'] else 'no'} reconstruction")
    else:
      model = run['model']
    if run['dataset'] != 'mnist':
      model += f" ({run['dataset']})"
    cells = [run['name'], model, run['precision'],
             f"{run['steps']} ({run['epochs']:.2f})",
             f"{run['wall_s'] / 60:.1f} min",
             _percent(run['validation_accuracy']),
             _percent(1 - run['test_accuracy']), run['paper']]
    if robustness is not None:
      cells += robustness_columns(robustness.get(run['workdir'])
                                  or robustness.get(run['name']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdirs', required=True,
                      help='comma-separated finished workdirs')
  parser.add_argument('--robustness',
                      help='robustness.json files of python -m '
                      'train.robustness, comma-separated')
  parser.add_argument('--out', help='also write the table here')
  args = parser.parse_args(argv)
  runs = []
  for workdir in filter(None, args.workdirs.split(',')):
    try:
      run = describe_run(workdir)
    except FileNotFoundError as error:
      print(f'error: {error}', file=sys.stderr)
      return 2
    run['workdir'] = workdir
    runs.append(run)
  robustness = None
  if args.robustness:
    results = {}
    for path in filter(None, args.robustness.split(',')):
      results.update(json.loads(Path(path).read_text()))
    robustness = {}
    for name, result in results.items():
      robustness[name] = result
      robustness[result.get('workdir', name)] = result
      robustness[Path(result.get('workdir', name)).name] = result
  text = table(runs, robustness)
  print(text)
  if args.out:
    Path(args.out).write_text(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
