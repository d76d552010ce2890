"""The paper's experiments (`campaign.ROWS`) as one resumable queue of runs.

    python -m train.reproduce --root=DIR [--rows=NAME,...] [--records=DIR]
        [--pretrained=DIR] [--figures=DIR]
    python -m train.reproduce --root=DIR --status
    python -m train.reproduce --docs=docs/reproduction.md [--records=DIR]

The queue runs the rows that have no record yet, in order, each in its own
workdir `DIR/<row>`; a killed queue, rerun, resumes the row it was in from
its last checkpoint (the training program's resume: at most the steps since
the last checkpoint are lost). A row that fails is reported and the queue
goes on with the next.

When a row finishes, its record (`campaign.training_record`) goes to
`--records` (default: `results/` in the repository) as `<row>.json`, and a
row shipped as a pretrained model (`Row.shipped_as`) is exported to
`--pretrained` (default: `train/pretrained/` in the repository) with its
model card, and a row with figures (`Row.figures`) draws them into
`--figures/<row>/` (default: `docs/figures/` in the repository, where
`--docs` links them). A robustness row sweeps each model from its workdir,
or from its shipped parameters where the workdir is gone (a new machine),
and then adds its figures to the shipped models' cards. Records, shipped
parameters and figures are what outlives the machine: commit them.
`--docs` writes the Markdown table of every record beside the paper's
figures (`campaign.docs_table`), and the records' figures (validation
curves, robustness sweeps: `campaign.docs_figures`) into `figures/` beside
it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from train import campaign
from train import workdir as workdir_lib

DEFAULT_RECORDS = campaign.REPO_ROOT / 'results'
DEFAULT_PRETRAINED = campaign.REPO_ROOT / 'train' / 'pretrained'
DEFAULT_FIGURES = campaign.REPO_ROOT / 'docs' / 'figures'


# ---------------------------------------------------------------------------
# State of a row.


def is_locked(workdir: Path) -> bool:
  """Whether a live run holds the workdir (`workdir.Lock`)."""
  path = workdir / workdir_lib.LOCK_FILE
  if not path.exists():
    return False
  with path.open('a') as file:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(file, fcntl.LOCK_UN)
  return False


def status_line(row: campaign.Row, root: Path, records: Path) -> str:
  """done / running / stopped / failed / pending, with the latest figures."""
  record_path = records / f'{row.name}.json'
  if record_path.exists():
    record = json.loads(record_path.read_text())
    if row.robustness_of:
      return f'{row.name}: done'
    return (f"{row.name}: done, {record['epochs']:.1f} epochs, test error "
            f"{100 * record['test']['test_error']:.2f}% (paper: "
            f'{row.paper})')
  workdir = root / row.name
  if row.robustness_of:
    return f'{row.name}: ' + ('running' if is_locked(workdir) else 'pending')
  epochs = [record
            for record in campaign.read_json_lines(workdir / 'metrics.jsonl')
            if record.get('kind') == 'epoch']
  total = row.num_epochs()
  if not epochs:
    state = 'running' if is_locked(workdir) else 'pending'
    return f'{row.name}: {state}, no epoch finished yet'
  latest = epochs[-1]
  where = f"epoch {latest['epoch']:g} of {total}"
  validated = [r['validation_accuracy'] for r in epochs
               if 'validation_accuracy' in r]
  validation = (f'validation accuracy {100 * validated[-1]:.2f}% '
                f'(best {100 * max(validated):.2f}%)' if validated else
                'no validation split')
  if is_locked(workdir):
    seconds = [record['seconds'] for record in epochs[-3:]]
    remaining = (total - latest['epoch']) * sum(seconds) / len(seconds)
    return (f'{row.name}: running, {where}, ETA {remaining / 3600:.1f} h, '
            f'{validation}')
  log = root / f'{row.name}.log'
  errors = [line for line in (log.read_text().splitlines()
                              if log.exists() else [])
            if line.startswith('error:')]
  if errors:
    return f'{row.name}: failed at {where} ({errors[-1]})'
  return f'{row.name}: stopped at {where}, {validation}'



# ---------------------------------------------------------------------------
# Running the queue.


def has_checkpoint(workdir: Path) -> bool:
  directory = workdir / 'checkpoints'
  return directory.is_dir() and any(directory.iterdir())


def model_sources(row: campaign.Row, root: Path, records: Path,
                  pretrained: Path) -> tuple[list[str], list[str]]:
  """A robustness row's `NAME=SOURCE` models for `train.robustness`, and
  the problems that keep it from running (rows not finished, or finished
  with neither a workdir nor shipped parameters left)."""
  sources, problems = [], []
  for name in row.robustness_of:
    workdir = root / name
    shipped_as = campaign.ROWS_BY_NAME[name].shipped_as
    if not (records / f'{name}.json').exists():
      problems.append(f'waiting for {name}')
    elif has_checkpoint(workdir):
      sources.append(f'{name}={workdir}')
    elif shipped_as and (pretrained / f'{shipped_as}.npz').exists():
      sources.append(f'{name}=pretrained:{shipped_as}')
    else:
      problems.append(
          f'the model of {name} is gone (no checkpoint in {workdir}, no '
          f'shipped parameters): delete {records / (name + ".json")} to '
          'train it again')
  return sources, problems


def _call(command: Sequence[str], log: Path) -> int:
  with log.open('a') as output:
    return subprocess.call(command, cwd=campaign.REPO_ROOT, stdout=output,
                           stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)


def run_row(row: campaign.Row, root: Path, records: Path,
            pretrained: Path = DEFAULT_PRETRAINED,
            figures: Path = DEFAULT_FIGURES) -> bool:
  """Runs (or resumes) one row to its end; writes its record (and, for a
  shipped row, its parameters and model card; for a row with figures,
  `figures/<row>/*.png`). True if it finished."""
  workdir = root / row.name
  log = root / f'{row.name}.log'
  if row.robustness_of:
    sources, problems = model_sources(row, root, records, pretrained)
    if problems:
      print(f'{row.name}: {"; ".join(problems)}', flush=True)
      return False
    command = [sys.executable, '-m', 'train.robustness',
               '--models=' + ','.join(sources), f'--out={workdir}',
               f'--angles={row.angles}',
               f'--num_examples={row.robustness_examples}',
               f'--pretrained_dir={pretrained}']
  else:
    command = row.train_command(workdir)
  print(f'{row.name}: {" ".join(command[1:])} (log: {log})', flush=True)
  start = time.monotonic()
  code = _call(command, log)
  if code != 0:
    print(f'{row.name}: failed (exit {code}); see {log}', flush=True)
    return False
  record_path = records / f'{row.name}.json'
  if row.robustness_of:
    record = {'row': row.name, 'what': row.what, 'paper': row.paper,
              'commit': campaign.commit(), 'machine': campaign.machine(),
              'hours': (time.monotonic() - start) / 3600,
              'results': _sources_under_root(
                  json.loads((workdir / 'robustness.json').read_text()),
                  root)}
  else:
    record = campaign.training_record(row, workdir)
  campaign.write_json(record_path, record)
  print(f'{row.name}: done; record {record_path}', flush=True)
  if row.shipped_as:
    exports = [(row.shipped_as, [f'--workdir={workdir}',
                                 f'--record={record_path}'])]
  else:  # a robustness row: its figures go into the shipped models' cards
    exports = []
    for name in row.robustness_of:
      shipped_as = campaign.ROWS_BY_NAME[name].shipped_as
      if shipped_as and (pretrained / f'{shipped_as}.json').exists():
        exports.append((shipped_as, [f'--record={records / (name + ".json")}',
                                     f'--robustness={record_path}']))
  if row.figures:
    code = _call([sys.executable, '-m', 'train.figures', f'--workdir={workdir}',
                  f'--out={figures / row.name}'], log)
    print(f'{row.name}: ' + (f'figures in {figures / row.name}' if code == 0
                             else f'figures failed (exit {code}); see {log}'),
          flush=True)
  for name, arguments in exports:
    code = _call([sys.executable, '-m', 'train.pretrained', f'--name={name}',
                  f'--out={pretrained}', *arguments], log)
    print(f'{row.name}: ' + (f'shipped as {pretrained / name}.npz' if code == 0
                             else f'exporting {name} failed (exit {code}); '
                             f'see {log}'), flush=True)
  return True


def _sources_under_root(results: dict[str, Any], root: Path
                        ) -> dict[str, Any]:
  """A robustness record names the workdirs it swept as `ROOT/<row>`: the
  queue's root is a path of one machine."""
  for result in results.values():
    source = Path(result['source'])
    if source.is_relative_to(root):
      result['source'] = str(Path('ROOT') / source.relative_to(root))
  return results


def run_queue(rows: Sequence[campaign.Row], root: Path, records: Path,
              pretrained: Path = DEFAULT_PRETRAINED,
              figures: Path = DEFAULT_FIGURES) -> int:
  failed = []
  for row in rows:
    if (records / f'{row.name}.json').exists():
      continue
    root.mkdir(parents=True, exist_ok=True)
    if not run_row(row, root, records, pretrained, figures):
      failed.append(row.name)
  return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--root', type=Path, help='folder of the workdirs')
  parser.add_argument('--records', type=Path, default=DEFAULT_RECORDS,
                      help='folder of the finished rows\' records')
  parser.add_argument('--pretrained', type=Path, default=DEFAULT_PRETRAINED,
                      help='folder of the shipped models\' parameters')
  parser.add_argument('--figures', type=Path, default=DEFAULT_FIGURES,
                      help='folder of the rows\' drawn figures (the docs\' '
                      'figures/)')
  parser.add_argument('--rows', default='',
                      help='comma-separated row names (default: all)')
  parser.add_argument('--status', action='store_true',
                      help='print one line per row and exit')
  parser.add_argument('--docs', type=Path,
                      help='write the Markdown table of the records here '
                      'and exit')
  args = parser.parse_args(argv)
  names = [name for name in args.rows.split(',') if name]
  unknown = [name for name in names if name not in campaign.ROWS_BY_NAME]
  if unknown:
    print(f'error: --rows: unknown row(s) {", ".join(unknown)}; rows: '
          f'{", ".join(campaign.ROWS_BY_NAME)}', file=sys.stderr)
    return 2
  rows = ([campaign.ROWS_BY_NAME[name] for name in names] if names
          else list(campaign.ROWS))
  if args.docs:
    figures = campaign.docs_figures(args.records,
                                    args.docs.parent / 'figures')
    args.docs.write_text(campaign.docs_table(
        args.records, figures={
            name: str(path.relative_to(args.docs.parent))
            for name, path in figures.items()}))
    print(f'wrote {args.docs}' + ''.join(f', {path}'
                                         for path in figures.values()))
    return 0
  if args.root is None:
    print('error: --root is required (the folder of the workdirs)',
          file=sys.stderr)
    return 2
  root = args.root.expanduser().absolute()
  if args.status:
    for row in rows:
      print(status_line(row, root, args.records))
    for setting in campaign.seed_settings(args.records, rows):
      if setting.records:
        print(f'{setting.name}: {len(setting.records)} of '
              f'{len(setting.rows)} seeds done, test error '
              f'{setting.test_error()} (paper: {setting.rows[0].paper})')
    return 0
  return run_queue(rows, root, args.records.expanduser().absolute(),
                   args.pretrained.expanduser().absolute(),
                   args.figures.expanduser().absolute())


if __name__ == '__main__':
  sys.exit(main())
