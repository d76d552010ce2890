"""One training step of the baseline and affNIST configs (tiny models), then
the robustness command over two of the resulting workdirs."""

import json

import pytest

from experiment_fixtures import check_run
from experiment_fixtures import fake_loading  # pylint: disable=unused-import
from experiment_fixtures import run
from experiment_fixtures import small_splits  # pylint: disable=unused-import
from experiment_fixtures import workdirs  # pylint: disable=unused-import
from train import robustness
from train.configs import affnist
from train.configs import baseline_cnn
from train.configs import lenet5

# 'rbg' keys: see conftest.fast_init_prng.
pytestmark = pytest.mark.usefixtures('fast_init_prng')


@pytest.mark.parametrize('name, make_config, image_size', [
    ('baseline_cnn', baseline_cnn.get_config, 28),
    ('lenet5', lenet5.get_config, 28),
    ('affnist', affnist.get_config, 40),
])
def test_one_step_of_each_config(name, make_config, image_size, workdirs,
                                 tmp_path_factory):
  workdir, results = run(name, make_config, workdirs, tmp_path_factory)
  epoch = check_run(workdir, results, make_config(), image_size)
  if name == 'affnist':
    assert 'train_reconstruction_loss' in epoch
  else:
    assert 'train_cross_entropy' in epoch


def test_robustness_command(workdirs, tmp_path_factory, tmp_path, capsys):
  lenet_dir, _ = run('lenet5', lenet5.get_config, workdirs, tmp_path_factory)
  affnist_dir, _ = run('affnist', affnist.get_config, workdirs,
                       tmp_path_factory)
  assert robustness.main([f'--models={lenet_dir},placed={affnist_dir}',
                          f'--out={tmp_path}', '--angles=-35,0,35',
                          '--num_examples=5', '--batch_size=5']) == 0
  results = json.loads((tmp_path / 'robustness.json').read_text())
  assert list(results) == [lenet_dir.name, 'placed']
  assert [r['input_size'] for r in results.values()] == [28, 40]
  for result in results.values():
    assert result['angles'] == [-35, 0, 35]
    assert len(result['accuracy']) == 3 and 'affine_accuracy' in result
  assert (tmp_path / 'robustness.png').is_file()
  assert 'affine' in capsys.readouterr().out
