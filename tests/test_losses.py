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


def test_spread_loss_is_zero_when_the_target_leads_by_the_margin():
  activations = jnp.array([[0.1, 0.95, 0.25], [0.3, 0.0, 0.0]])
  labels = jnp.array([1, 0])
  # Leads of 0.85 and 0.7 (example 0), 0.3 and 0.3 (example 1): >= 0.3.
  chex.assert_trees_all_equal(
      losses.spread_loss(activations, labels, margin=0.3), jnp.zeros(2))
  # A margin of 0.8: example 0's lead of 0.7 costs 0.1^2, example 1's two
  # leads of 0.3 cost 0.5^2 each.
  chex.assert_trees_all_close(
      losses.spread_loss(activations, labels, margin=0.8),
      jnp.array([0.01, 2 * 0.5**2]), atol=1e-6)


def test_spread_loss_hand_computed():
  activations = jnp.array([[0.5, 0.6, 0.1, 0.45]])
  # t = 0, m = 0.2: class 1: (0.2 - (0.5 - 0.6))^2 = 0.09; class 2: lead 0.4
  # -> 0; class 3: (0.2 - 0.05)^2 = 0.0225.
  expected = jnp.array([0.1125])
  chex.assert_trees_all_close(
      losses.spread_loss(activations, jnp.array([0]), margin=0.2), expected,
      atol=1e-6)
  # One-hot targets give the same; the target's own term is never counted.
  chex.assert_trees_all_close(
      losses.spread_loss(activations, jax.nn.one_hot(jnp.array([0]), 4),
                         margin=0.2), expected, atol=1e-6)


def test_spread_loss_gradient_is_finite_and_pushes_the_target_up():
  activations = jnp.array([[0.5, 0.6, 0.1], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 2])
  gradient = jax.grad(
      lambda a: jnp.sum(losses.spread_loss(a, labels, margin=0.9)))(
          activations)
  chex.assert_tree_all_finite(gradient)
  assert bool(gradient[0, 0] < 0) and bool(gradient[1, 2] < 0)
  assert bool(jnp.all(gradient[0, 1:] > 0)) and bool(
      jnp.all(gradient[1, :2] > 0))


def test_spread_loss_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='labels'):
    losses.spread_loss(jnp.zeros((2, 5)), jnp.zeros((2, 4)))


def test_spread_loss_margin_schedule_rises_linearly_from_02_to_09():
  margin = jax.jit(losses.spread_loss_margin, static_argnums=1)
  chex.assert_trees_all_close(
      [margin(step, 100) for step in (0, 50, 100, 1_000)],
      [0.2, 0.55, 0.9, 0.9], atol=1e-6)
  steps = jnp.arange(101)
  values = jax.vmap(lambda step: losses.spread_loss_margin(step, 100))(steps)
  chex.assert_trees_all_close(jnp.diff(values), jnp.full(100, 0.007),
                              atol=1e-6)
  chex.assert_trees_all_close(
      losses.spread_loss_margin(3, 4, initial=0.0, final=1.0), 0.75)
