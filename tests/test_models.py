"""The paper's CapsNet: parameter counts, outputs, batch independence, and a
gradient step that is finite."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from capsjax import losses

# 'rbg' keys (see conftest.fast_init_prng): the tests check properties, not
# values that depend on the random draws.
pytestmark = pytest.mark.usefixtures('fast_init_prng')


def _parameter_count(model, image_shape):
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, *image_shape))
  )
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def test_parameter_counts_match_the_paper():
  assert _parameter_count(capsjax.CapsNet(), (28, 28, 1)) == 8_215_568
  assert (
      _parameter_count(capsjax.CapsNet(use_decoder=False), (28, 28, 1))
      == 6_804_224
  )


def test_official_layers_initialise_as_the_official_code():
  model = capsjax.CapsNet(official_layers=True, primary_capsule_scale=1 / 32)
  assert _parameter_count(model, (28, 28, 1)) == 8_215_568 + 10 * 16
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  biases = {'conv1': params['conv1']['bias'],
            'primary': params['primary_capsules']['Conv2D_0']['bias'],
            'class': params['class_capsules']['bias'],
            **{name: layer['bias'] for name, layer in params['decoder'].items()}}
  for bias in biases.values():
    chex.assert_trees_all_equal(bias, jnp.full(bias.shape, 0.1))
  kernels = {0.05: [params['conv1']['kernel']],
             0.1: [params['primary_capsules']['Conv2D_0']['kernel'],
                   params['class_capsules']['weights'],
                   *(layer['kernel'] for layer in params['decoder'].values())]}
  for stddev, arrays in kernels.items():
    for kernel in arrays:
      # Cut at two standard deviations, whose standard deviation is then
      # 0.88 of the uncut one's.
      assert float(jnp.max(jnp.abs(kernel))) <= 2 * stddev + 1e-6
      np.testing.assert_allclose(float(jnp.std(kernel)), 0.8796 * stddev,
                                 rtol=0.1)
  images = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  lengths = model.apply({'params': params}, images).lengths
  assert bool(jnp.all((lengths > 0.01) & (lengths < 1)))


def test_parameter_shapes_of_each_layer():
  shapes = jax.eval_shape(
      capsjax.CapsNet().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))
  )['params']
  chex.assert_shape(shapes['conv1']['kernel'], (9, 9, 1, 256))
  chex.assert_shape(shapes['primary_capsules']['Conv2D_0']['kernel'],
                    (9, 9, 256, 256))
  chex.assert_shape(shapes['class_capsules']['weights'], (1152, 10, 8, 16))
  chex.assert_shape(shapes['decoder']['Dense_2']['kernel'], (1024, 784))


def test_larger_inputs_give_more_primary_capsules():
  shapes = jax.eval_shape(
      capsjax.CapsNet().init, jax.random.key(0), jnp.zeros((1, 36, 36, 1))
  )['params']
  # 36x36 -> 28x28 after conv1 -> 10x10 primary capsule grid, 32 types.
  chex.assert_shape(shapes['class_capsules']['weights'], (3200, 10, 8, 16))


# A small CapsNet keeps compile times low; the maths is the same code.
SMALL = dict(conv_features=16, primary_capsule_types=4, decoder_hidden_sizes=(32,))


@pytest.fixture(scope='module')
def small_model_and_params():
  model = capsjax.CapsNet(**SMALL)
  images = jax.random.uniform(jax.random.key(0), (9, 28, 28, 1))
  params = model.init(jax.random.key(1), images[:1])['params']
  return model, params, images


def test_outputs(small_model_and_params):
  model, params, images = small_model_and_params
  output = jax.jit(model.apply)({'params': params}, images)
  chex.assert_shape(output.capsules, (9, 10, 16))
  chex.assert_shape(output.lengths, (9, 10))
  chex.assert_shape(output.reconstructions, (9, 28, 28, 1))
  chex.assert_trees_all_close(
      output.lengths, jnp.linalg.norm(output.capsules, axis=-1),
      rtol=1e-5, atol=1e-4,
  )
  assert bool(jnp.all((output.lengths >= 0) & (output.lengths < 1)))


def test_conv_methods_give_the_same_network(small_model_and_params):
  """The same parameters under 'patches' and 'fourier' convolutions."""
  model, params, images = small_model_and_params
  outputs = {
      method: jax.jit(model.clone(conv_method=method).apply)(
          {'params': params}, images)
      for method in ('patches', 'fourier')
  }
  chex.assert_trees_all_close(outputs['patches'], outputs['fourier'],
                              rtol=1e-4, atol=1e-5)


def test_prediction_does_not_depend_on_the_batch(small_model_and_params):
  model, params, images = small_model_and_params
  apply = jax.jit(model.apply)
  in_batch = apply({'params': params}, images).lengths
  alone = apply({'params': params}, images[4:5]).lengths
  chex.assert_trees_all_close(alone[0], in_batch[4], rtol=1e-5, atol=1e-6)


def test_without_decoder_no_reconstruction():
  model = capsjax.CapsNet(use_decoder=False, **SMALL)
  images = jnp.zeros((2, 28, 28, 1))
  params = model.init(jax.random.key(0), images)
  assert model.apply(params, images).reconstructions is None


def test_loss_gradient_is_finite_even_on_blank_images(small_model_and_params):
  model, params, _ = small_model_and_params
  images = jnp.zeros((2, 28, 28, 1))
  labels = jnp.array([3, 7])

  def loss(params):
    output = model.apply({'params': params}, images, labels)
    return jnp.mean(
        losses.margin_loss(output.lengths, jax.nn.one_hot(labels, 10))
        + losses.reconstruction_loss(output.reconstructions, images)
    )

  gradients = jax.jit(jax.grad(loss))(params)
  chex.assert_tree_all_finite(gradients)
  # Blank images with zero biases make every capsule input exactly zero, the
  # case where an unsafe norm would give NaN; the decoder still learns.
  assert float(jnp.abs(gradients['decoder']['Dense_1']['bias']).sum()) > 0


def test_bad_input_rank_is_an_error():
  with pytest.raises(ValueError, match='batch, height, width, channels'):
    capsjax.CapsNet(**SMALL).init(jax.random.key(0), jnp.zeros((28, 28, 1)))


def test_parameter_counts_of_each_routing():
  counts = {routing: _parameter_count(capsjax.CapsNet(routing=routing),
                                      (28, 28, 1))
            for routing in capsjax.routing.ALGORITHMS}
  # 'em' adds beta_u and beta_a per class, 'self_attention' a log prior per
  # (primary capsule, class) pair; the default is the paper's network.
  assert counts == {'dynamic': 8_215_568, 'none': 8_215_568,
                    'em': 8_215_568 + 2 * 10,
                    'self_attention': 8_215_568 + 1152 * 10}


@pytest.mark.parametrize('routing', ['em', 'self_attention', 'none'])
def test_every_routing_trains_the_same_network(routing):
  model = capsjax.CapsNet(routing=routing, **SMALL)
  images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  labels = jnp.array([1, 2, 3])
  params = model.init(jax.random.key(1), images[:1])['params']

  def loss(params):
    output = model.apply({'params': params}, images, labels)
    return jnp.mean(
        losses.margin_loss(output.lengths, jax.nn.one_hot(labels, 10))
        + losses.reconstruction_loss(output.reconstructions, images)), output

  (_, output), gradients = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params)
  chex.assert_shape(output.capsules, (3, 10, 16))
  assert bool(jnp.all((output.lengths > 0) & (output.lengths < 1)))
  chex.assert_tree_all_finite(gradients)
  assert float(jnp.abs(gradients['class_capsules']['weights']).sum()) > 0


def test_efficient_capsnet_has_the_papers_parameter_count():
  model = capsjax.EfficientCapsNet(use_decoder=False)
  assert _parameter_count(model, (28, 28, 1)) - _batch_stats_count(
      model) == 161_824
  # The decoder (not counted by the paper) is CapsNet's.
  assert _parameter_count(capsjax.EfficientCapsNet(), (28, 28, 1)) - (
      _batch_stats_count(model)) == 161_824 + 1_411_344


def _batch_stats_count(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 28, 28, 1)))
  return sum(math.prod(leaf.shape)
             for leaf in jax.tree.leaves(shapes['batch_stats']))


def test_efficient_capsnet_training_step_updates_batch_stats():
  model = capsjax.EfficientCapsNet(decoder_hidden_sizes=(16,))
  images = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1),
                                                       np.float32))
  variables = model.init(jax.random.key(1), images)

  @jax.jit
  def step(variables):
    def loss(params):
      output, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          images, jnp.array([0, 1]), train=True, mutable=['batch_stats'])
      return jnp.mean(losses.margin_loss(
          output.lengths, jax.nn.one_hot(jnp.array([0, 1]), 10))), (
              output, updates)
    return jax.grad(loss, has_aux=True)(variables['params'])

  gradients, (output, updates) = step(variables)
  chex.assert_shape(output.capsules, (2, 10, 16))
  assert bool(jnp.all((output.lengths >= 0) & (output.lengths < 1)))
  chex.assert_tree_all_finite(gradients)
  assert not np.allclose(updates['batch_stats']['BatchNorm_0']['mean'],
                         variables['batch_stats']['BatchNorm_0']['mean'])
