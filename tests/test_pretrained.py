"""train/pretrained.py: shipped parameters, exported and loaded safely."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import datasets
from train import models
from train import trained
from train import tfds_splits
from train import pretrained
from train.configs import default

from experiment_fixtures import fake_loading, run, small_splits, workdirs  # pylint: disable=unused-import,g-bad-import-order

pytestmark = pytest.mark.usefixtures('fast_init_prng')


def test_export_then_load_gives_the_best_checkpoint(workdirs, tmp_path_factory,
                                                     tmp_path, small_splits):
  workdir, results = run('capsnet', default.get_config, workdirs,
                         tmp_path_factory)
  record = {'machine': {'cpu_count': 2, 'cpu': 'Some CPU'}, 'epochs': 0.5,
            'steps': 1, 'train_hours': 0.01, 'commit': 'abc1234',
            'command': 'python -m train.main --workdir=DIR', 'best_epoch': 0.5,
            'paper': '0.25% test error', 'paper_length': '50 epochs'}
  robustness = {'results': {'tiny': {'angles': [0.0, 35.0, 45.0],
                                     'accuracy': [0.9, 0.5, 0.25],
                                     'affine_accuracy': 0.75}}}
  path = pretrained.export(workdir, 'tiny', tmp_path, record=record,
                           robustness=robustness)

  # The model card's figures are the test results' and the records'.
  card = path.with_suffix('.md').read_text()
  assert f"test error {100 * results['test_error']:.2f}%" in card
  assert '0.5 epochs (1 steps), 0.0 h on a 2-core Some CPU' in card
  assert 'tiny, rotated test set: 0 deg 90.00%, 35 deg 50.00%' in card
  assert 'affine test set 75.00%' in card

  # Plain arrays: numpy reads them without unpickling anything.
  with np.load(path, allow_pickle=False) as arrays:
    assert 'conv1/kernel' in arrays.files
  meta = json.loads(path.with_suffix('.json').read_text())
  assert meta['checkpoint_step'] == results['checkpoint_step']
  assert meta['test_results'] == results
  assert pretrained.available(tmp_path) == ['tiny']

  model, params = pretrained.load('tiny', tmp_path)
  expected = trained.restore_best(workdir).state.params
  chex.assert_trees_all_equal(params, jax.device_get(expected))
  images = jnp.asarray(small_splits.test_images[:4])
  output = model.apply({'params': params}, images)
  chex.assert_shape(output.lengths, (4, 10))
  chex.assert_shape(output.reconstructions, (4, 28, 28, 1))


def test_model_card_says_when_the_parameters_are_an_average():
  config = default.get_config().to_dict()
  meta = {'name': 'tiny', 'parameters': 10, 'checkpoint_step': 5,
          'config': config, 'test_results': None}
  assert 'moving average' not in pretrained.model_card(meta)
  config['parameter_average_decay'] = 0.999
  assert ('- parameters: the training\'s moving average of them (decay '
          '0.999 a step' in pretrained.model_card(meta))


def test_model_card_names_the_official_network():
  config = default.get_config().to_dict()
  meta = {'name': 'tiny', 'parameters': 10, 'checkpoint_step': 5,
          'config': config, 'test_results': None}
  assert 'official' not in pretrained.model_card(meta)
  config['model'].update(official_layers=True, primary_capsule_scale=0.03125)
  assert ("reconstruction weight 0.0005; the official code's initialisation "
          "and class capsule bias (`official_layers`), PrimaryCaps' "
          'convolution x0.03125' in pretrained.model_card(meta))


def test_damaged_or_unknown_file_is_refused(workdirs, tmp_path_factory,
                                            tmp_path):
  workdir, _ = run('capsnet', default.get_config, workdirs, tmp_path_factory)
  path = pretrained.export(workdir, 'tiny', tmp_path)
  with pytest.raises(pretrained.PretrainedError, match="no pretrained model "
                     "'other'.*available: tiny"):
    pretrained.load('other', tmp_path)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(pretrained.PretrainedError,
                     match='does not match.*damaged'):
    pretrained.load('tiny', tmp_path)


SHIPPED = pretrained.available() or [
    pytest.param('mnist', marks=pytest.mark.skip(reason='nothing shipped'))]


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_model_classifies_real_test_digits(name, mnist_idx_dir):
  """Each shipped model, loaded through its checksum, makes on the first
  1,000 real test digits about the errors its card reports for all 10,000."""
  restored = pretrained.restore(name)
  model, params = pretrained.load(name)  # The README's way: the same.
  assert model == restored.model
  chex.assert_trees_all_equal(params, restored.params)
  meta = json.loads((pretrained.DIRECTORY / f'{name}.json').read_text())
  test = meta['test_results']
  assert test['test_examples'] == 10000
  count = 1000
  spec = datasets.KNOWN_IDX_FILES['mnist']
  images, labels = datasets.read_idx_split(
      mnist_idx_dir / spec['test_images'].filename,
      mnist_idx_dir / spec['test_labels'].filename)
  images = jnp.asarray(tfds_splits.to_float_images(images[:count]))
  chex.assert_shape(images, (count, *restored.image_shape))
  predictions = jax.jit(lambda images: models.class_scores(
      restored.model.apply(restored.variables, images)).argmax(-1))(images)
  errors = int(np.sum(np.asarray(predictions) != labels[:count]))
  # Binomial: the card's error rate on 1,000 digits, within 3 standard
  # deviations (and a few digits, for the test set's uneven difficulty).
  expected = test['test_error'] * count
  assert errors <= expected + 3 * np.sqrt(expected) + 3, (errors, expected)


def test_predictions_do_not_depend_on_the_batches_per_call(mnist_idx_dir):
  """`make_predict` runs several batches per compiled call; the completing
  batches of padding and the padded rows are dropped."""
  restored = pretrained.restore('lenet5')
  spec = datasets.KNOWN_IDX_FILES['mnist']
  images, _ = datasets.read_idx_split(
      mnist_idx_dir / spec['test_images'].filename,
      mnist_idx_dir / spec['test_labels'].filename)
  images = tfds_splits.to_float_images(images[:10])
  direct = np.asarray(models.class_scores(
      restored.model.apply(restored.variables, images)).argmax(-1))
  for batches_per_call in (1, 2, 8):  # 3 batches of 4: padded stacks too.
    predict = trained.make_predict(restored, batch_size=4,
                                   batches_per_call=batches_per_call)
    np.testing.assert_array_equal(predict(images), direct,
                                  err_msg=str(batches_per_call))
  assert trained.make_predict(restored)(images[:0]).shape == (0,)
