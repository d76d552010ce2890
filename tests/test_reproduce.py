"""train/reproduce.py and train/campaign.py: the queue of runs, its status
and its records."""

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from train import campaign
from train import config_checks
from train import reproduce
from train import workdir as workdir_lib


@pytest.fixture
def tiny_row(mnist_idx_dir, mnist_tfds_dir, monkeypatch):
  """One epoch (8 steps of 8 examples) of a tiny CapsNet on real MNIST."""
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  overrides = {
      'num_epochs': 1, 'batch_size': 8, 'eval_batch_size': 50,
      'num_train_examples': 64, 'num_eval_examples': 100,
      'model.conv_features': 16, 'model.primary_capsule_types': 4,
      'model.decoder_hidden_sizes': '(32,64)', 'num_reconstructions': 0,
      'data_dir': mnist_idx_dir, 'tfds_data_dir': mnist_tfds_dir,
  }
  return campaign.Row(name='tiny', what='a tiny CapsNet',
                      paper='0.25% test error', paper_length='-',
                      overrides=tuple(overrides.items()))


def test_queue_runs_records_ships_and_skips_finished_rows(
    tiny_row, tmp_path, monkeypatch, capsys):
  """A row runs to its record and, shipped, exports its parameters and
  card; on a machine without its workdir the robustness row sweeps those
  and adds its figures to the card."""
  root, records = tmp_path / 'runs', tmp_path / 'records'
  shipped, drawn = tmp_path / 'pretrained', tmp_path / 'figures'
  row = dataclasses.replace(tiny_row, shipped_as='tiny_model', figures=True)
  monkeypatch.setitem(campaign.ROWS_BY_NAME, 'tiny', row)
  sweep = campaign.Row(name='sweep', what='rotations', paper='-',
                       paper_length='-', robustness_of=('tiny',),
                       angles='0,90', robustness_examples=40)
  assert reproduce.status_line(row, root, records) == (
      'tiny: pending, no epoch finished yet')
  assert not reproduce.run_row(sweep, root, records, shipped, drawn)
  assert 'waiting for tiny' in capsys.readouterr().out

  assert reproduce.run_queue([row], root, records, shipped, drawn) == 0

  record = json.loads((records / 'tiny.json').read_text())
  assert record['steps'] == 8 and record['epochs'] == 1
  assert record['test'] == json.loads(
      (root / 'tiny' / 'test_results.json').read_text())
  assert record['test']['test_examples'] == 100
  assert len(record['validation_curve']) == 1
  assert len(record['training_curve']) == 1
  assert 0 <= record['training_curve'][0][1] <= 1
  assert record['config']['model']['conv_features'] == 16
  assert record['commit'] and record['machine']['cpu_count'] >= 1
  assert 0.1 < record['peak_resident_gib'] < 64
  assert record['paper'] == '0.25% test error'
  status = reproduce.status_line(row, root, records)
  assert status == ('tiny: done, 1.0 epochs, test error '
                    f"{100 * record['test']['test_error']:.2f}% (paper: "
                    '0.25% test error)')
  table = campaign.docs_table(records, [row])
  assert ('| tiny | a tiny CapsNet | 1 epochs (8 steps, 64 images seen) |'
          in table)
  assert '0.25% test error' in table

  # Shipped: the parameters, their JSON and the model card.
  test = record['test']
  meta = json.loads((shipped / 'tiny_model.json').read_text())
  assert meta['test_results'] == test
  assert meta['checkpoint_step'] == 8
  card = (shipped / 'tiny_model.md').read_text()
  assert f"test error {100 * test['test_error']:.2f}%" in card
  assert '1 epochs (8 steps)' in card and 'rotated' not in card

  # Its model's figures.
  assert {path.name for path in (drawn / 'tiny').glob('*.png')} >= {
      'reconstructions.png', 'perturbation_0.png'}

  # A finished row is not run again.
  log_size = (root / 'tiny.log').stat().st_size
  assert reproduce.run_queue([row], root, records, shipped, drawn) == 0
  assert (root / 'tiny.log').stat().st_size == log_size

  shutil.rmtree(root / 'tiny')  # a new machine: the records and shipped
  assert reproduce.run_queue([sweep], root, records, shipped, drawn) == 0
  results = json.loads((records / 'sweep.json').read_text())['results']
  assert results['tiny']['source'] == 'pretrained:tiny_model'
  assert results['tiny']['angles'] == [0.0, 90.0]
  assert results['tiny']['test_examples'] == 40
  assert results['tiny']['checkpoint_step'] == 8
  card = (shipped / 'tiny_model.md').read_text()
  assert 'tiny, rotated test set: 0 deg' in card
  assert '(both from the first 40 test digits)' in card
  assert f"test error {100 * test['test_error']:.2f}%" in card

  # The docs' table and figures, from the records alone.
  figures = campaign.docs_figures(records, drawn, [row, sweep])
  assert {'curves', 'sweep', 'tiny/reconstructions'} <= set(figures)
  for path in figures.values():
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  table = campaign.docs_table(records, [row, sweep], figures={
      name: str(path.relative_to(tmp_path)) for name, path in figures.items()})
  assert '![validation curves](figures/reproduction_curves.png)' in table
  assert '![sweep](figures/sweep.png)' in table
  assert ('![tiny/reconstructions](figures/tiny/reconstructions.png)'
          in table)
  assert '| tiny | ' in table and '| 0 deg | 90 deg | affine |' in table

  # Neither a workdir nor shipped parameters: it says what to do.
  (records / 'sweep.json').unlink()
  (shipped / 'tiny_model.npz').unlink()
  capsys.readouterr()
  assert reproduce.run_queue([sweep], root, records, shipped, drawn) == 1
  assert 'the model of tiny is gone' in capsys.readouterr().out


def _write_record(records, row, test_error, dataset='mnist'):
  """A finished row's record, as `campaign.training_record` writes it."""
  campaign.write_json(records / f'{row.name}.json', {
      'row': row.name, 'steps': 4290, 'epochs': 10, 'train_hours': 0.5,
      'machine': {'cpu_count': 2, 'cpu': 'CPU'}, 'best_epoch': 9,
      'validation_curve': [[9, 0.995], [10, 0.994]],
      'test': {'test_error': test_error, 'test_accuracy': 1 - test_error},
      'config': {'batch_size': 128, 'dataset': dataset}})


def test_table_summarises_seeds_and_names_other_test_sets(tmp_path,
                                                            capsys):
  """Rows of one setting get its mean +- sample std over finished seeds;
  a row tested on another set says which; MultiMNIST counts pairs."""
  rows = [row for row in campaign.ROWS
          if row.name.startswith(('ablation_r1_recon', 'ablation_r3_recon'))
          or row.name in ('affnist_capsnet', 'multimnist_capsnet')]
  errors = {'ablation_r1_recon_seed0': 0.0030,
            'ablation_r1_recon_seed1': 0.0034,
            'ablation_r1_recon_seed2': 0.0026,
            'ablation_r3_recon_seed1': 0.0031,
            'affnist_capsnet': 0.21, 'multimnist_capsnet': 0.08}
  for row in rows:
    if row.name in errors:
      _write_record(tmp_path, row, errors[row.name],
                    'multimnist' if 'multimnist' in row.name else 'mnist')
  table = campaign.docs_table(tmp_path, rows)
  assert ('| 1 routing iteration(s), with reconstruction | 3 of 3 | 0.30% +- '
          '0.040 | 0.30%, 0.34%, 0.26% | 10 epochs (4290 steps, 549,120 '
          'images seen) | 0.29% +- 0.011 test error |') in table
  assert ('| 3 routing iteration(s), with reconstruction | 1 of 3 | 0.31% '
          '(one seed) | 0.31% |') in table
  assert '| 21.00% on the affine test set | 79% affNIST accuracy |' in table
  assert '549,120 pairs seen' in table
  assert ('Not finished yet: ablation_r3_recon_seed0, '
          'ablation_r3_recon_seed2.') in table
  # MultiMNIST's error against the pairs seen, linked from the table.
  figures = campaign.docs_figures(tmp_path, tmp_path / 'figures', rows)
  pairs = figures['multimnist_capsnet/error_by_pairs_seen']
  assert pairs.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert not [name for name in figures if name.startswith('ablation')
              and '/' in name]
  assert '![multimnist_capsnet/error_by_pairs_seen](' in campaign.docs_table(
      tmp_path, rows, figures={name: str(path)
                               for name, path in figures.items()})
  assert reproduce.main(['--root', str(tmp_path / 'runs'), '--records',
                         str(tmp_path), '--status', '--rows',
                         ','.join(row.name for row in rows)]) == 0
  status = capsys.readouterr().out
  assert ('1 routing iteration(s), with reconstruction: 3 of 3 seeds done, '
          'test error 0.30% +- 0.040 (paper: 0.29% +- 0.011 test error)'
          in status)
  assert 'ablation_r3_recon_seed0: pending, no epoch finished yet' in status


def test_status_of_running_and_stopped_rows(tiny_row, tmp_path):
  root, records = tmp_path / 'runs', tmp_path / 'records'
  workdir = root / 'tiny'
  workdir.mkdir(parents=True)
  (workdir / 'metrics.jsonl').write_text(json.dumps({
      'kind': 'epoch', 'step': 4, 'epoch': 0.5, 'seconds': 1800.0,
      'validation_accuracy': 0.9876}) + '\n')
  assert reproduce.status_line(tiny_row, root, records) == (
      'tiny: stopped at epoch 0.5 of 1, validation accuracy 98.76% (best '
      '98.76%)')
  lock = workdir_lib.Lock(workdir)
  try:
    assert reproduce.status_line(tiny_row, root, records) == (
        'tiny: running, epoch 0.5 of 1, ETA 0.2 h, validation accuracy '
        '98.76% (best 98.76%)')
  finally:
    lock.release()


def test_record_and_status_of_a_row_without_validation_split(tmp_path):
  """A row trained on every training example (config.validation_size
  = 0) has no validation curve: its last epoch is the tested one."""
  row = campaign.ROWS_BY_NAME['mnist_r3_recon_all_digits']
  root, records, figures = (tmp_path / 'runs', tmp_path / 'records',
                            tmp_path / 'figures')
  workdir = root / row.name
  workdir.mkdir(parents=True)
  epochs = [{'kind': 'epoch', 'step': 468 * epoch, 'epoch': float(epoch),
             'seconds': 200.0, 'train_accuracy': 0.99}
            for epoch in (1, 2)]
  (workdir / 'metrics.jsonl').write_text(
      ''.join(json.dumps(record) + '\n' for record in epochs))
  assert reproduce.status_line(row, root, records) == (
      f'{row.name}: stopped at epoch 2 of 30, no validation split')

  (workdir / 'config.json').write_text(json.dumps(
      {'batch_size': 128, 'dataset': 'mnist', 'validation_size': 0}))
  (workdir / 'test_results.json').write_text(json.dumps(
      {'checkpoint_step': 936, 'validation_accuracy': None,
       'test_error': 0.004, 'test_accuracy': 0.996}))
  record = campaign.training_record(row, workdir)
  assert record['validation_curve'] == []
  assert record['training_curve'] == [[1.0, 0.99], [2.0, 0.99]]
  assert record['best_epoch'] == 2.0 and record['steps'] == 936
  assert record['peak_resident_gib'] is None  # not in these epoch records
  campaign.write_json(records / f'{row.name}.json', record)
  assert '| none held out (last epoch tested) | 0.40% |' in (
      campaign.docs_table(records, [row]))
  assert 'curves' not in campaign.docs_figures(records, figures, [row])


def test_every_training_row_is_a_valid_config():
  """Each row's config file with its overrides passes the checks that
  `python -m train.main` makes before it starts."""
  for row in campaign.ROWS:
    if row.robustness_of:
      continue
    path, _, argument = row.config.partition(':')
    spec = importlib.util.spec_from_file_location(
        'row_config', campaign.REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*([argument] if argument else []))
    for field, value in row.overrides:
      *parents, name = field.split('.')
      section = config
      for parent in parents:
        section = section[parent]
      section[name] = value
    config_checks.validate_config(config, num_devices=1)


def test_rows_are_valid_and_unknown_rows_refused(capsys):
  names = [row.name for row in campaign.ROWS]
  assert len(names) == len(set(names))
  assert names[0] == 'mnist_r3_recon'
  for row in campaign.ROWS:
    for name in row.robustness_of:
      assert names.index(name) < names.index(row.name)
  assert reproduce.main(['--root=/nonexistent', '--rows=nope']) == 2
  assert 'unknown row(s) nope' in capsys.readouterr().err


def test_robustness_record_names_swept_workdirs_under_the_root(tmp_path):
  results = {'a': {'source': str(tmp_path / 'row_a')},
             'b': {'source': 'pretrained:tiny_model'}}
  assert reproduce._sources_under_root(results, tmp_path) == {
      'a': {'source': 'ROOT/row_a'}, 'b': {'source': 'pretrained:tiny_model'}}


def test_readme_figures_of_records_are_the_records():
  """A README line that links a record quotes that record's test error."""
  root = Path(__file__).resolve().parents[1]
  quoted = 0
  for line in (root / 'README.md').read_text().splitlines():
    for name in re.findall(r'\(results/(\w+)\.json\)', line):
      record = json.loads((root / 'results' / f'{name}.json').read_text())
      assert f"| {100 * record['test']['test_error']:.2f}% |" in line, line
      quoted += 1
  assert quoted >= 2
