"""Linen layers: channel grouping in PrimaryCapsules, routing layer, decoder
masking in training and inference modes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import capsjax
from capsjax import layers


def test_primary_capsules_group_channels_not_positions():
  features = jax.random.normal(jax.random.key(0), (2, 10, 10, 6))
  module = layers.PrimaryCapsules(capsule_types=3, capsule_dim=4,
                                  kernel_size=3, stride=2)
  variables = module.init(jax.random.key(1), features)
  capsules = module.apply(variables, features)
  chex.assert_shape(capsules, (2, 4 * 4 * 3, 4))
  maps = layers.Conv2D(12, 3, 2).apply(
      {'params': variables['params']['Conv2D_0']}, features
  )
  # Capsule (y=1, x=2, type=2) is channels 8..11 of position (1, 2).
  index = (1 * 4 + 2) * 3 + 2
  chex.assert_trees_all_close(
      capsules[:, index], capsjax.squash(maps[:, 1, 2, 8:12]), rtol=1e-5
  )
  assert bool(jnp.all(jnp.linalg.norm(capsules, axis=-1) < 1.0))


def test_primary_capsules_scale_the_convolution_not_its_bias():
  features = jax.random.normal(jax.random.key(0), (2, 7, 7, 5))
  module = layers.PrimaryCapsules(
      capsule_types=2, capsule_dim=4, kernel_size=3, stride=2,
      output_scale=1 / 32, bias_init=jax.nn.initializers.constant(0.1))
  variables = module.init(jax.random.key(1), features)
  params = variables['params']['Conv2D_0']
  chex.assert_trees_all_equal(params['bias'], jnp.full((8,), 0.1))
  unbiased = layers.Conv2D(8, 3, 2, use_bias=False).apply(
      {'params': {'kernel': params['kernel']}}, features)
  expected = capsjax.squash(
      (unbiased / 32 + params['bias']).reshape(2, -1, 4))
  chex.assert_trees_all_close(module.apply(variables, features), expected,
                              rtol=1e-5, atol=1e-6)


def test_capsule_layer_bias_is_added_to_every_parent_before_the_squash():
  capsules = capsjax.squash(jax.random.normal(jax.random.key(0), (3, 20, 8)))
  module = layers.CapsuleLayer(
      out_capsules=4, out_dim=6, routing_iterations=3, use_bias=True,
      bias_init=jax.nn.initializers.constant(0.1))
  variables = module.init(jax.random.key(1), capsules)
  chex.assert_trees_all_equal(variables['params']['bias'],
                              jnp.full((4, 6), 0.1))
  u_hat = capsjax.routing.prediction_vectors(
      capsules, variables['params']['weights'])
  expected = capsjax.routing.dynamic_routing(
      u_hat, 3, bias=variables['params']['bias'])
  chex.assert_trees_all_close(module.apply(variables, capsules).poses,
                              expected, atol=1e-6)
  without = layers.CapsuleLayer(4, 6, routing_iterations=3).apply(
      {'params': {'weights': variables['params']['weights']}}, capsules)
  assert not np.allclose(without.poses, expected, atol=1e-3)
  with np.testing.assert_raises_regex(ValueError, "use_bias is for 'dynamic'"):
    layers.CapsuleLayer(4, 6, routing='none', use_bias=True).init(
        jax.random.key(1), capsules)


def test_capsule_layer_shapes_and_parameters():
  capsules = capsjax.squash(jax.random.normal(jax.random.key(0), (3, 20, 8)))
  module = layers.CapsuleLayer(out_capsules=4, out_dim=6, routing_iterations=2)
  variables = module.init(jax.random.key(1), capsules)
  chex.assert_shape(variables['params']['weights'], (20, 4, 8, 6))
  output = module.apply(variables, capsules)
  chex.assert_shape(output.poses, (3, 4, 6))
  chex.assert_shape(output.activations, (3, 4))


def test_mask_capsules_keeps_only_the_label():
  capsules = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1
  masked = layers.mask_capsules(capsules, jnp.array([2, 0]))
  np.testing.assert_array_equal(
      masked, [[0, 0, 0, 0, 5, 6], [7, 8, 0, 0, 0, 0]]
  )


def _decoder_and_capsules():
  capsules = 0.3 * jax.random.normal(jax.random.key(0), (4, 5, 3))
  decoder = layers.MaskedDecoder(output_shape=(6, 6, 1), hidden_sizes=(8,))
  variables = decoder.init(jax.random.key(1), capsules, jnp.zeros(4, jnp.int32))
  return decoder, variables, capsules


def test_decoder_in_training_uses_the_label():
  decoder, variables, capsules = _decoder_and_capsules()
  labels = jnp.array([0, 1, 2, 3])
  reconstructions = decoder.apply(variables, capsules, labels)
  chex.assert_shape(reconstructions, (4, 6, 6, 1))
  # Changing any capsule other than the label's leaves it unchanged ...
  other = capsules.at[jnp.arange(4), (labels + 1) % 5].add(1.0)
  chex.assert_trees_all_close(
      decoder.apply(variables, other, labels), reconstructions
  )
  # ... changing the label's capsule does not.
  same = capsules.at[jnp.arange(4), labels].add(1.0)
  assert not np.allclose(decoder.apply(variables, same, labels),
                         reconstructions)


def test_decoder_without_labels_uses_the_longest_capsule():
  decoder, variables, capsules = _decoder_and_capsules()
  longest = jnp.argmax(jnp.linalg.norm(capsules, axis=-1), axis=-1)
  chex.assert_trees_all_close(
      decoder.apply(variables, capsules),
      decoder.apply(variables, capsules, longest),
  )
  pixels = decoder.apply(variables, capsules)
  assert bool(jnp.all((pixels >= 0) & (pixels <= 1)))


def test_decoder_decodes_each_of_several_labels():
  decoder, variables, capsules = _decoder_and_capsules()
  pairs = jnp.array([[0, 1], [2, 3], [4, 0], [1, 2]])
  both = decoder.apply(variables, capsules, pairs)
  chex.assert_shape(both, (4, 2, 6, 6, 1))
  chex.assert_trees_all_close(
      both[:, 1], decoder.apply(variables, capsules, pairs[:, 1]), atol=1e-6
  )
