"""MultiMNIST: one training step of its config (tiny CapsNet), the figures
command on the result, one step with each routing and of Efficient-CapsNet,
and the config checks of the experiments."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiment_fixtures import check_run
from experiment_fixtures import fake_loading  # pylint: disable=unused-import
from experiment_fixtures import run
from experiment_fixtures import small_splits  # pylint: disable=unused-import
from experiment_fixtures import workdirs  # pylint: disable=unused-import
from train import figures
from train import config_checks
from train import trained
from train.configs import affnist
from train.configs import baseline_cnn
from train.configs import default
from train.configs import efficient_capsnet
from train.configs import multimnist

# 'rbg' keys: see conftest.fast_init_prng.
pytestmark = pytest.mark.usefixtures('fast_init_prng')


def _multimnist_run(workdirs, tmp_path_factory):
  # Also draws reconstructions.png of pairs at the end.
  return run('multimnist', multimnist.get_config, workdirs, tmp_path_factory,
             num_reconstructions=2)


def test_one_step_of_multimnist(workdirs, tmp_path_factory):
  workdir, results = _multimnist_run(workdirs, tmp_path_factory)
  epoch = check_run(workdir, results, multimnist.get_config(), 36)
  assert 'validation_per_digit_accuracy' in epoch
  assert epoch['train_reconstruction_loss'] > 0
  assert (workdir / 'reconstructions.png').is_file()


def test_multimnist_figures_command(workdirs, tmp_path_factory, tmp_path):
  workdir, _ = _multimnist_run(workdirs, tmp_path_factory)
  assert figures.main([f'--workdir={workdir}', f'--out={tmp_path}',
                       '--num_examples=3', '--perturb=0']) == 0
  assert (tmp_path / 'multimnist.png').is_file()
  assert (tmp_path / 'perturbation_0.png').is_file()


def test_config_errors_are_named():
  config = default.get_config()
  config.dataset = 'multimnist'
  with pytest.raises(config_checks.ConfigError, match='configs/multimnist.py'):
    config_checks.validate_config(config, 1)
  config = baseline_cnn.get_config()
  config.reconstruction_weight = 0.0005
  with pytest.raises(config_checks.ConfigError, match='reconstruction_weight'):
    config_checks.validate_config(config, 1)
  config = multimnist.get_config()
  config.max_shift = 5
  with pytest.raises(config_checks.ConfigError, match='max_shift'):
    config_checks.validate_config(config, 1)
  config = default.get_config()
  config.model.name = 'resnet'
  with pytest.raises(config_checks.ConfigError, match='model.name'):
    config_checks.validate_config(config, 1)
  for model in ('baseline_cnn', 'lenet5'):
    assert multimnist.get_config(model).model.name == model
    assert affnist.get_config(model).reconstruction_weight == 0
  config = default.get_config()
  config.model.routing = 'k_means'
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.model.routing='k_means': must be one of"):
    config_checks.validate_config(config, 1)
  config = default.get_config()
  config.max_shift = 2.8
  with pytest.raises(config_checks.ConfigError,
                     match=r'max_shift=2.8: must be a whole number'):
    config_checks.validate_config(config, 1)
  config.subpixel_shifts = True
  config_checks.validate_config(config, 1)
  config.max_shift = float('inf')
  with pytest.raises(config_checks.ConfigError,
                     match=r'max_shift=inf: must be a finite number'):
    config_checks.validate_config(config, 1)
  config = multimnist.get_config()
  config.subpixel_shifts = True
  with pytest.raises(config_checks.ConfigError,
                     match=r'subpixel_shifts=True: is for mnist'):
    config_checks.validate_config(config, 1)
  config = default.get_config()
  config.model.official_layers = True
  config.model.routing = 'em'
  with pytest.raises(config_checks.ConfigError,
                     match=r"model.official_layers=True: is the official"):
    config_checks.validate_config(config, 1)
  config = default.get_config()
  config.stop_at_validation_accuracy = 99.2  # a percentage, not a fraction
  with pytest.raises(config_checks.ConfigError,
                     match=r'stop_at_validation_accuracy=99.2: must be in'):
    config_checks.validate_config(config, 1)


@pytest.mark.parametrize('routing', ['em', 'self_attention'])
def test_one_step_with_each_routing(routing, workdirs, tmp_path_factory):
  """`--config.model.routing=...` trains the same MNIST network: the
  algorithms with learned arrays of their own here ('dynamic' in every other
  test; 'none' has nothing 'dynamic' lacks, and every routing trains in
  tests/test_models.py)."""

  def make_config():
    config = default.get_config()
    config.model.routing = routing
    return config

  workdir, results = run(f'routing_{routing}', make_config, workdirs,
                         tmp_path_factory)
  epoch = check_run(workdir, results, make_config(), 28)
  assert epoch['train_loss'] > 0 and epoch['train_gradient_norm'] > 0
  assert json.loads((workdir / 'config.json').read_text())['model'][
      'routing'] == routing


def test_one_step_of_efficient_capsnet(workdirs, tmp_path_factory):
  """The batch-norm network trains, keeps its moving statistics in the
  checkpoint, and is restored and evaluated with them."""
  workdir, results = run('efficient_capsnet', efficient_capsnet.get_config,
                         workdirs, tmp_path_factory)
  epoch = check_run(workdir, results, efficient_capsnet.get_config(), 28)
  assert epoch['train_loss'] > 0 and epoch['train_gradient_norm'] > 0
  restored = trained.restore_best(workdir)
  moving_means = [value for path, value in
                  jax.tree_util.tree_leaves_with_path(
                      restored.state.model_state['batch_stats'])
                  if 'mean' in jax.tree_util.keystr(path)]
  assert len(moving_means) == 4
  # One update from the zero init: 0.01 x the batch mean of ReLU features.
  assert all(float(jnp.max(mean)) > 0 for mean in moving_means)
  predict = trained.make_predict(restored, batch_size=4)
  chex.assert_shape(predict(np.zeros((6, 28, 28, 1), np.float32)), (6,))


def test_efficient_capsnet_refuses_another_routing():
  config = efficient_capsnet.get_config()
  config.model.routing = 'dynamic'
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.model.routing='dynamic': must be "
                           r"'self_attention' for model.name="):
    config_checks.validate_config(config, 1)
