"""train/results.py: the results table from finished workdirs."""

import json

import pytest

from train import results
from train.configs import baseline_cnn
from train.configs import default


def _finished_run(path, config, epochs, test_accuracy):
  path.mkdir()
  (path / 'config.json').write_text(config.to_json())
  (path / 'metrics.jsonl').write_text(''.join(
      json.dumps({'kind': 'epoch', 'step': step, 'seconds': seconds}) + '\n'
      for step, seconds in epochs))
  (path / 'test_results.json').write_text(json.dumps({
      'validation_accuracy': 0.99, 'test_accuracy': test_accuracy,
      'test_examples': 10000}))
  return path


def test_rows_say_what_was_trained_for_how_long_beside_the_paper(tmp_path):
  config = default.get_config()
  config.model.routing_iterations = 1
  config.reconstruction_weight = 0.0
  capsnet = _finished_run(tmp_path / 'r1', config,
                          [(430, 600.0), (500, 90.0)], 0.9925)
  cnn = _finished_run(tmp_path / 'cnn', baseline_cnn.get_config(),
                      [(100, 300.0)], 0.98)

  run = results.describe_run(capsnet)
  assert run['steps'] == 500 and run['wall_s'] == 690.0
  assert run['epochs'] == pytest.approx(500 * 128 / 55000)
  assert run['paper'] == '0.34% error'  # r=1, no reconstruction
  assert results.describe_run(cnn)['paper'] == '0.39% error'

  table = results.table([run, results.describe_run(cnn)])
  lines = table.splitlines()
  assert len(lines) == 4
  assert lines[2].startswith(
      '| r1 | CapsNet r=1, no reconstruction | float32 | 500 (1.16) | ')
  assert '11.5 min' in lines[2] and '0.75%' in lines[2]  # 1 - 0.9925
  assert 'baseline_cnn' in lines[3] and '2.00%' in lines[3]


def test_robustness_columns():
  sweep = {'angles': [-35.0, 0.0, 35.0, 60.0],
           'accuracy': [0.9, 0.99, 0.8, 0.5], 'affine_accuracy': 0.7}
  assert results.robustness_columns(sweep) == [
      '99.00%', '90.00% / 80.00%', '50.00% at +60', '70.00%']
  assert results.robustness_columns(None) == ['-'] * 4


def test_an_unfinished_workdir_is_named(tmp_path, capsys):
  (tmp_path / 'half').mkdir()
  assert results.main(['--workdirs', str(tmp_path / 'half')]) == 2
  assert 'no config.json' in capsys.readouterr().err
