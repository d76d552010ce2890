"""Hand-computed values of the margin and reconstruction losses."""

import chex
import jax
import jax.numpy as jnp
import pytest

from capsjax import losses


def test_margin_loss_hand_computed():
  lengths = jnp.array([[0.95, 0.05, 0.5], [0.2, 0.7, 0.1]])
  targets = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
  # Example 0: present 0.95 >= 0.9 -> 0; absent 0.05 <= 0.1 -> 0;
  #   absent 0.5 -> 0.5 * 0.4^2 = 0.08.
  # Example 1: present 0.2 -> 0.7^2 = 0.49; absent 0.7 -> 0.5 * 0.6^2 = 0.18;
  #   absent 0.1 -> 0.
  chex.assert_trees_all_close(
      losses.margin_loss(lengths, targets), jnp.array([0.08, 0.67]), atol=1e-6
  )


def test_margin_loss_two_positive_classes():
  lengths = jnp.array([[0.5, 0.8, 0.3]])
  targets = jnp.array([[1.0, 1.0, 0.0]])
  # 0.4^2 + 0.1^2 + 0.5 * 0.2^2 = 0.16 + 0.01 + 0.02
  chex.assert_trees_all_close(
      losses.margin_loss(lengths, targets), jnp.array([0.19]), atol=1e-6
  )


def test_margin_loss_arguments():
  lengths = jnp.array([[0.5, 0.5]])
  targets = jnp.array([[1.0, 0.0]])
  value = losses.margin_loss(
      lengths, targets, margin_positive=0.8, margin_negative=0.2,
      absent_class_weight=1.0,
  )
  chex.assert_trees_all_close(value, jnp.array([0.09 + 0.09]), atol=1e-6)


def test_margin_loss_is_zero_when_perfect_and_no_softmax_applied():
  lengths = jnp.array([[0.05, 0.92, 0.0]])
  targets = jax.nn.one_hot(jnp.array([1]), 3)
  chex.assert_trees_all_equal(losses.margin_loss(lengths, targets), jnp.zeros(1))


def test_reconstruction_loss_hand_computed():
  images = jnp.zeros((2, 2, 2, 1))
  reconstructions = jnp.stack([jnp.full((2, 2, 1), 0.5), jnp.ones((2, 2, 1))])
  # 4 pixels * 0.25 = 1.0 and 4 pixels * 1 = 4.0, times 0.0005.
  chex.assert_trees_all_close(
      losses.reconstruction_loss(reconstructions, images),
      jnp.array([0.0005, 0.002]),
  )
  chex.assert_trees_all_close(
      losses.reconstruction_loss(reconstructions, images, weight=1.0),
      jnp.array([1.0, 4.0]),
  )


def test_reconstruction_loss_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='same shape'):
    losses.reconstruction_loss(jnp.zeros((2, 784)), jnp.zeros((2, 28, 28, 1)))
