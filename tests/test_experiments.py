"""One training step of each experiment config (tiny models), then the
robustness and figures commands on the resulting workdirs."""

import json

import jax
import numpy as np
import pytest

from train import datasets
from train import experiments
from train import figures
from train import input_pipeline
from train import robustness
from train import train
from train.configs import affnist
from train.configs import baseline_cnn
from train.configs import default
from train.configs import lenet5
from train.configs import multimnist


@pytest.fixture(autouse=True, scope='module')
def fast_init_prng():
  """'rbg' keys here: XLA:CPU compiles parameter initialisation with the
  default threefry keys about 20x slower (measured 26 s against 1.2 s for a
  tiny CapsNet's create_train_state); no test here depends on the values."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')
  yield
  jax.config.update('jax_default_prng_impl', previous)


@pytest.fixture(scope='module')
def small_splits(mnist_idx_dir):
  """Real MNIST test digits as a tiny Splits (read from the IDX files)."""
  spec = datasets.KNOWN_IDX_FILES['mnist']
  images, labels = datasets.read_idx_split(
      mnist_idx_dir / spec['test_images'].filename,
      mnist_idx_dir / spec['test_labels'].filename)
  images = input_pipeline.to_float_images(images[:300])
  labels = labels[:300].astype(np.int32)
  return input_pipeline.Splits(images[:100], labels[:100], images[100:200],
                               labels[100:200], images[200:], labels[200:])


@pytest.fixture(autouse=True)
def fake_loading(monkeypatch, small_splits):
  def load_splits(dataset, data_dir, tfds_data_dir, validation_size=5000):
    del data_dir, tfds_data_dir, validation_size
    assert dataset == 'mnist'
    return small_splits
  monkeypatch.setattr(input_pipeline, 'load_splits', load_splits)


def _tiny(config):
  config.max_steps = 1
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_examples = 8
  config.num_eval_examples = 6  # 2 eval batches, the last one padded
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  config.num_reconstructions = 0
  config.model.conv_features = 8
  config.model.primary_capsule_types = 2
  config.model.decoder_hidden_sizes = (16,)
  if 'cnn' in config.model:
    config.model.cnn.conv_features = (4, 4, 2)
    config.model.cnn.hidden_sizes = (8, 6)
  return config


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  """Runs each config once; {name: (workdir, results)}."""
  return {}


def _run(name, make_config, workdirs, tmp_path_factory):
  if name not in workdirs:
    workdir = tmp_path_factory.mktemp(name)
    config = _tiny(make_config())
    results = train.train_and_evaluate(config, str(workdir))
    workdirs[name] = (workdir, results)
  return workdirs[name]


@pytest.mark.parametrize('name, make_config, image_size', [
    ('multimnist', multimnist.get_config, 36),
    ('baseline_cnn', baseline_cnn.get_config, 28),
    ('lenet5', lenet5.get_config, 28),
    ('affnist', affnist.get_config, 40),
])
def test_one_step_of_each_config(name, make_config, image_size, workdirs,
                                 tmp_path_factory):
  workdir, results = _run(name, make_config, workdirs, tmp_path_factory)
  assert results['checkpoint_step'] == 1
  assert results['test_examples'] == 6
  assert 0.0 <= results['test_accuracy'] <= 1.0
  assert np.isfinite(results['test_loss'])
  saved = experiments.load_config(workdir)
  assert saved.dataset == make_config().dataset
  assert experiments.model_name(saved) == make_config().model.name
  records = [json.loads(line)
             for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  epoch = [r for r in records if r['kind'] == 'epoch'][0]
  if name == 'multimnist':
    assert 'validation_per_digit_accuracy' in epoch
    assert 'train_reconstruction_loss' in epoch
  elif name in ('baseline_cnn', 'lenet5'):
    assert 'train_cross_entropy' in epoch
  restored = experiments.restore_best(workdir)
  assert restored.image_shape == (image_size, image_size, 1)


def test_multimnist_figures_command(workdirs, tmp_path_factory, tmp_path):
  workdir, _ = _run('multimnist', multimnist.get_config, workdirs,
                    tmp_path_factory)
  assert figures.main([f'--workdir={workdir}', f'--out={tmp_path}',
                       '--num_examples=3', '--perturb=0']) == 0
  assert (tmp_path / 'multimnist.png').is_file()
  assert (tmp_path / 'perturbation_0.png').is_file()


def test_robustness_command(workdirs, tmp_path_factory, tmp_path, capsys):
  lenet_dir, _ = _run('lenet5', lenet5.get_config, workdirs,
                      tmp_path_factory)
  affnist_dir, _ = _run('affnist', affnist.get_config, workdirs,
                        tmp_path_factory)
  assert robustness.main([f'--workdirs={lenet_dir},{affnist_dir}',
                          f'--out={tmp_path}', '--angles=-35,0,35',
                          '--num_examples=5', '--batch_size=5']) == 0
  results = json.loads((tmp_path / 'robustness.json').read_text())
  assert [r['input_size'] for r in results.values()] == [28, 40]
  for result in results.values():
    assert result['angles'] == [-35, 0, 35]
    assert len(result['accuracy']) == 3 and 'affine_accuracy' in result
  assert (tmp_path / 'robustness.png').is_file()
  assert '35' in capsys.readouterr().out


def test_config_errors_are_named():
  config = default.get_config()
  config.dataset = 'multimnist'
  with pytest.raises(train.ConfigError, match='configs/multimnist.py'):
    train.validate_config(config, 1)
  config = baseline_cnn.get_config()
  config.reconstruction_weight = 0.0005
  with pytest.raises(train.ConfigError, match='reconstruction_weight'):
    train.validate_config(config, 1)
  config = multimnist.get_config()
  config.max_shift = 5
  with pytest.raises(train.ConfigError, match='max_shift'):
    train.validate_config(config, 1)
  config = default.get_config()
  config.model.name = 'resnet'
  with pytest.raises(train.ConfigError, match='model.name'):
    train.validate_config(config, 1)
  for model in ('baseline_cnn', 'lenet5'):
    assert multimnist.get_config(model).model.name == model
    assert affnist.get_config(model).reconstruction_weight == 0
