"""The baseline CNN and LeNet-5: parameter counts, shapes, dropout, and
LeNet-5's batch-minor layout against its NHWC one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import baselines


# 'rbg' keys: see conftest.fast_init_prng.
pytestmark = pytest.mark.usefixtures('fast_init_prng')


def test_baseline_cnn_parameter_count_matches_the_paper():
  # Paper: 35.4M. Conv 6,656 + 1,638,656 + 819,328; FC 28*28*128*328 + 328
  # = 32,915,784; 63,168; logits 1,930.
  assert baselines.parameter_count(baselines.BaselineCNN(),
                                   (28, 28, 1)) == 35_445_522
  # Pooling after the first two convs would shrink the first FC 16x.
  assert baselines.parameter_count(baselines.BaselineCNN(pool_after=(0, 1)),
                                   (28, 28, 1)) == 4_587_282


def test_lenet5_parameter_count():
  # 156 + 2,416 + 400*120+120 + 120*84+84 + 84*10+10.
  assert baselines.parameter_count(baselines.LeNet5(), (28, 28, 1)) == 61_706


def test_parameter_shapes():
  shapes = jax.eval_shape(baselines.BaselineCNN().init, jax.random.key(0),
                          jnp.zeros((1, 28, 28, 1)))['params']
  chex.assert_shape(shapes['conv1']['kernel'], (5, 5, 1, 256))
  chex.assert_shape(shapes['conv3']['kernel'], (5, 5, 256, 128))
  chex.assert_shape(shapes['fc1']['kernel'], (28 * 28 * 128, 328))
  chex.assert_shape(shapes['logits']['kernel'], (192, 10))


@pytest.mark.parametrize('kind', ['max', 'avg'])
@pytest.mark.parametrize('height, width', [(6, 6), (5, 7), (4, 9)])
def test_pool_2x2_matches_flax_pooling_and_its_gradient(kind, height, width):
  """Even, odd and rectangular grids: values and gradients as flax's
  reduce_window pooling ('SAME', stride 2; avg counts the padding)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  reference = {'max': nn.max_pool, 'avg': nn.avg_pool}[kind]
  # Distinct values, so each window's maximum is unique and the two
  # gradients (which differ only in how they split ties) must agree.
  images = jax.random.permutation(
      jax.random.key(0), jnp.arange(2 * height * width * 3, dtype=jnp.float32)
  ).reshape(2, height, width, 3) / 10.0 - 3.0
  cotangent = jax.random.normal(jax.random.key(1),
                                (2, (height + 1) // 2, (width + 1) // 2, 3))

  def ours(x):
    return jnp.sum(baselines.pool_2x2(x, kind) * cotangent)

  def flax_pool(x):
    return jnp.sum(reference(x, (2, 2), strides=(2, 2), padding='SAME')
                   * cotangent)

  chex.assert_trees_all_close(
      baselines.pool_2x2(images, kind),
      reference(images, (2, 2), strides=(2, 2), padding='SAME'), atol=1e-6)
  chex.assert_trees_all_close(jax.grad(ours)(images),
                              jax.grad(flax_pool)(images), atol=1e-6)


def test_pool_2x2_max_splits_a_tie_and_keeps_the_gradient_finite():
  # After a ReLU, windows of equal values (zeros) are common.
  images = jnp.zeros((1, 2, 2, 1))
  gradient = jax.grad(
      lambda x: jnp.sum(baselines.pool_2x2(x, 'max')))(images)
  chex.assert_tree_all_finite(gradient)
  np.testing.assert_allclose(np.asarray(gradient).ravel(), [0.25] * 4)


def test_pool_2x2_rejects_an_unknown_kind():
  with pytest.raises(ValueError, match="pooling 'min' must be 'max' or 'avg'"):
    baselines.pool_2x2(jnp.zeros((1, 2, 2, 1)), 'min')


TINY_CNN = dict(conv_features=(4, 4, 2), hidden_sizes=(8, 6))


@pytest.mark.parametrize('make, size', [
    (lambda: baselines.BaselineCNN(**TINY_CNN), 28),
    (lambda: baselines.BaselineCNN(**TINY_CNN, pool_after=(1,)), 36),
    (baselines.LeNet5, 28),
    (lambda: baselines.LeNet5(activation='tanh', pooling='avg'), 40),
])
def test_forward_shapes(make, size):
  model = make()
  images = jax.random.uniform(jax.random.key(0), (3, size, size, 1))

  @jax.jit
  def run(images):
    params = model.init(jax.random.key(1), images[:1])
    return model.apply(params, images, jnp.zeros(3, jnp.int32))

  output = run(images)
  assert isinstance(output, baselines.ClassifierOutput)
  chex.assert_shape(output.logits, (3, 10))
  assert output.reconstructions is None
  chex.assert_tree_all_finite(output.logits)


@pytest.mark.parametrize('make', [
    lambda implementation: baselines.BaselineCNN(
        **TINY_CNN, conv_implementation=implementation),
    lambda implementation: baselines.LeNet5(
        conv_implementation=implementation),
])
@pytest.mark.parametrize('implementation', ['patches', 'fourier', 'auto'])
def test_capsjax_convolutions_match_lax_conv(make, implementation):
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  ours, lax = make(implementation), make('lax')

  @jax.jit
  def run(images):
    params = ours.init(jax.random.key(1), images)
    # Same parameter tree ('kernel' HWIO and 'bias'), so the same values.
    return ours.apply(params, images).logits, lax.apply(params,
                                                        images).logits

  chex.assert_trees_all_close(*run(images), atol=1e-5)


@pytest.mark.parametrize('height, width, in_channels, out_channels', [
    (12, 12, 1, 6), (11, 9, 3, 4)])
def test_conv_batch_minor_matches_lax_conv(height, width, in_channels,
                                           out_channels):
  """Value and both gradients against `lax.conv_general_dilated` (NHWC),
  on an even square and an odd rectangular grid."""
  images = jax.random.normal(jax.random.key(0), (2, height, width,
                                                 in_channels))
  kernel = jax.random.normal(jax.random.key(1), (5, 5, in_channels,
                                                 out_channels))
  cotangent = jax.random.normal(jax.random.key(2), (2, height - 4, width - 4,
                                                    out_channels))

  def by_lax(images, kernel):
    outputs = jax.lax.conv_general_dilated(
        images, kernel, (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(outputs * cotangent), outputs

  def batch_minor(images, kernel):
    outputs = jnp.transpose(baselines.conv_batch_minor(
        jnp.transpose(images, (3, 1, 2, 0)), kernel), (3, 1, 2, 0))
    return jnp.sum(outputs * cotangent), outputs

  (_, expected), expected_gradients = jax.jit(jax.value_and_grad(
      by_lax, argnums=(0, 1), has_aux=True))(images, kernel)
  (_, ours), gradients = jax.jit(jax.value_and_grad(
      batch_minor, argnums=(0, 1), has_aux=True))(images, kernel)
  chex.assert_trees_all_close(ours, expected, atol=1e-4, rtol=1e-5)
  chex.assert_trees_all_close(gradients, expected_gradients, atol=1e-3,
                              rtol=1e-5)
  with pytest.raises(ValueError, match='channels'):
    baselines.conv_batch_minor(jnp.zeros((in_channels + 1, 9, 9, 2)), kernel)
  with pytest.raises(ValueError, match="padding 'valid' must be"):
    baselines.BatchMinorConv(4, 5, padding='valid').init(
        jax.random.key(0), jnp.zeros((in_channels, 9, 9, 2)))


@pytest.mark.parametrize('activation, pooling, height, width', [
    ('relu', 'max', 28, 28),
    ('tanh', 'avg', 36, 36),
    ('relu', 'max', 29, 27),  # odd sides: the pooling pads
])
def test_lenet5_batch_minor_layout_matches_nhwc(activation, pooling, height,
                                                width):
  """The same parameters give the same logits and gradients either way."""
  images = jax.random.uniform(jax.random.key(0), (3, height, width, 1))
  labels = jnp.array([1, 7, 3])
  batch_minor, nhwc = (
      baselines.LeNet5(activation=activation, pooling=pooling,
                       conv_implementation=implementation, layout=layout)
      for implementation, layout in (('patches', 'batch_minor'),
                                     ('lax', 'nhwc')))

  @jax.jit
  def run(images):
    params = batch_minor.init(jax.random.key(1), images)['params']
    chex.assert_trees_all_equal_shapes(
        params, nhwc.init(jax.random.key(1), images)['params'])

    def loss(params, model):
      logits = model.apply({'params': params}, images).logits
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                           labels[:, None], axis=1))

    return [jax.value_and_grad(loss)(params, model)
            for model in (batch_minor, nhwc)]

  (loss, gradients), (expected_loss, expected_gradients) = run(images)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  chex.assert_trees_all_close(gradients, expected_gradients, atol=1e-5)
  chex.assert_tree_all_finite(gradients)


def test_lenet5_layout_resolution():
  """'auto' takes the batch-minor layout on the CPU with convolutions by
  patches, NHWC elsewhere (cuDNN, TPU) or with other convolutions."""
  for implementation in ('auto', 'patches'):
    assert baselines.resolve_layout('auto', implementation,
                                    'cpu') == 'batch_minor'
  for implementation in ('lax', 'fourier'):
    assert baselines.resolve_layout('auto', implementation, 'cpu') == 'nhwc'
  for platform in ('gpu', 'cuda', 'rocm', 'tpu'):
    assert baselines.resolve_layout('auto', 'auto', platform) == 'nhwc'
  assert baselines.resolve_layout('nhwc', 'patches', 'cpu') == 'nhwc'
  assert baselines.resolve_layout('batch_minor', 'auto', 'gpu') == (
      'batch_minor')
  with pytest.raises(ValueError, match="conv_implementation must be 'auto' "
                     "or 'patches', got 'lax'"):
    baselines.resolve_layout('batch_minor', 'lax')
  with pytest.raises(ValueError, match="layout 'nchw' must be one of"):
    baselines.LeNet5(layout='nchw').init(jax.random.key(0),
                                         jnp.zeros((1, 28, 28, 1)))


def test_dropout_only_when_not_deterministic():
  model = baselines.BaselineCNN(**TINY_CNN, dropout_rate=0.5)
  images = jax.random.uniform(jax.random.key(0), (4, 12, 12, 1))

  @jax.jit
  def run(images):
    params = model.init(jax.random.key(1), images)
    return (model.apply(params, images).logits,
            model.apply(params, images, deterministic=True).logits,
            *(model.apply(params, images, deterministic=False,
                          rngs={'dropout': jax.random.key(seed)}).logits
              for seed in (2, 3)))

  test_a, test_b, train_a, train_b = run(images)
  np.testing.assert_array_equal(test_a, test_b)
  assert not np.allclose(train_a, train_b)


def test_unknown_options_are_named():
  images = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match='implementation'):
    baselines.BaselineCNN(**TINY_CNN, conv_implementation='fft').init(
        jax.random.key(0), images)
  with pytest.raises(ValueError, match='activation'):
    baselines.LeNet5(activation='gelu').init(jax.random.key(0), images)
