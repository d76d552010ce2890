"""Shared by the experiment tests (import the fixtures into a test module):
tiny real data instead of the whole of MNIST, fast parameter init, and
one-step training runs of the experiment configs with tiny models."""

import json

import numpy as np
import pytest

from train import datasets
from train import models
from train import tfds_splits
from train import train
from train import trained
from train import workdir as workdir_lib


@pytest.fixture(scope='module')
def small_splits(mnist_idx_dir):
  """300 real MNIST test digits as a tiny Splits (read from the IDX files)."""
  spec = datasets.KNOWN_IDX_FILES['mnist']
  images, labels = datasets.read_idx_split(
      mnist_idx_dir / spec['test_images'].filename,
      mnist_idx_dir / spec['test_labels'].filename)
  images = tfds_splits.to_float_images(images[:300])
  labels = labels[:300].astype(np.int32)
  return tfds_splits.Splits(images[:100], labels[:100], images[100:200],
                               labels[100:200], images[200:], labels[200:])


@pytest.fixture(autouse=True)
def fake_loading(monkeypatch, small_splits):
  """`tfds_splits.load_splits` returns `small_splits` (no tfds)."""
  def load_splits(dataset, data_dir, tfds_data_dir, validation_size=5000):
    del data_dir, tfds_data_dir, validation_size
    assert dataset == 'mnist'
    return small_splits
  monkeypatch.setattr(tfds_splits, 'load_splits', load_splits)


def tiny(config):
  """One step of a tiny model on a few examples."""
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
def workdirs():
  """{name: (workdir, results)} of the runs made so far in the module."""
  return {}


def run(name, make_config, workdirs, tmp_path_factory,
        num_reconstructions=0):
  """Trains `tiny(make_config())` once per module; (workdir, results)."""
  if name not in workdirs:
    workdir = tmp_path_factory.mktemp(name)
    config = tiny(make_config())
    config.num_reconstructions = num_reconstructions
    results = train.train_and_evaluate(config, str(workdir))
    workdirs[name] = (workdir, results)
  return workdirs[name]


def check_run(workdir, results, config, image_size):
  """What every one-step run must leave behind; returns the epoch record."""
  assert results['checkpoint_step'] == 1
  assert results['test_examples'] == 6
  assert 0.0 <= results['test_accuracy'] <= 1.0
  assert np.isfinite(results['test_loss'])
  saved = workdir_lib.load_config(workdir)
  assert saved.dataset == config.dataset
  assert models.model_name(saved) == config.model.name
  records = [json.loads(line)
             for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  restored = trained.restore_best(workdir)
  assert restored.image_shape == (image_size, image_size, 1)
  return [r for r in records if r['kind'] == 'epoch'][0]
