"""Hand-made cases of the top-k and MultiMNIST metrics."""

import chex
import jax.numpy as jnp
import pytest

from capsjax import losses
from capsjax import metrics

SCORES = jnp.array([
    [0.1, 0.9, 0.2, 0.8],  # top-2: {1, 3}
    [0.7, 0.1, 0.6, 0.0],  # top-2: {0, 2}
    [0.3, 0.4, 0.5, 0.6],  # top-2: {3, 2}
])


def test_top_k_classes_best_first():
  chex.assert_trees_all_equal(
      metrics.top_k_classes(SCORES, 2),
      jnp.array([[1, 3], [0, 2], [3, 2]], jnp.int32))
  chex.assert_trees_all_equal(metrics.top_k_classes(SCORES, 1)[:, 0],
                              jnp.array([1, 0, 3], jnp.int32))


def test_top_k_classes_checks_k():
  with pytest.raises(ValueError, match='k=5'):
    metrics.top_k_classes(SCORES, 5)


def test_multi_hot():
  chex.assert_trees_all_equal(
      metrics.multi_hot(jnp.array([[1, 3], [2, 2]]), 4),
      jnp.array([[0., 1., 0., 1.], [0., 0., 1., 0.]]))
  chex.assert_trees_all_equal(metrics.multi_hot(jnp.array([0, 3]), 4),
                              jnp.array([[1., 0., 0., 0.], [0., 0., 0., 1.]]))


def test_top_k_multi_hot():
  chex.assert_trees_all_equal(
      metrics.top_k_multi_hot(SCORES, 2),
      jnp.array([[0., 1., 0., 1.], [1., 0., 1., 0.], [0., 0., 1., 1.]]))


def test_multi_label_accuracy_any_order_both_needed():
  labels = jnp.array([
      [3, 1],  # both right, the other order: right
      [0, 1],  # one right, one wrong: wrong
      [0, 1],  # both wrong: wrong
  ])
  chex.assert_trees_all_equal(metrics.multi_label_accuracy(SCORES, labels),
                              jnp.array([1., 0., 0.]))


def test_multi_label_accuracy_repeated_label_is_never_right():
  # Top-2 of row 0 is {1, 3}; labels (1, 1) hold only one class.
  chex.assert_trees_all_equal(
      metrics.multi_label_accuracy(SCORES[:1], jnp.array([[1, 1]])),
      jnp.array([0.]))


def test_multi_label_accuracy_with_one_label_is_accuracy():
  labels = jnp.array([1, 2, 3])
  chex.assert_trees_all_equal(
      metrics.multi_label_accuracy(SCORES, labels[:, None]),
      metrics.accuracy(SCORES, labels))
  chex.assert_trees_all_equal(metrics.accuracy(SCORES, labels),
                              jnp.array([1., 0., 1.]))


def test_per_label_and_top_k_accuracy():
  labels = jnp.array([[3, 1], [0, 1], [1, 0]])
  chex.assert_trees_all_close(metrics.per_label_accuracy(SCORES, labels),
                              jnp.array([1., 0.5, 0.]))
  chex.assert_trees_all_equal(
      metrics.top_k_accuracy(SCORES, jnp.array([3, 1, 2]), 2),
      jnp.array([1., 0., 1.]))


def test_multi_hot_targets_feed_the_margin_loss():
  # Two present classes: the margin loss of a (batch, 2) label pair.
  lengths = jnp.array([[0.5, 0.8, 0.3]])
  targets = metrics.multi_hot(jnp.array([[0, 1]]), 3)
  chex.assert_trees_all_close(losses.margin_loss(lengths, targets),
                              jnp.array([0.19]), atol=1e-6)


def test_rank_checks():
  with pytest.raises(ValueError, match='batch, k'):
    metrics.multi_label_accuracy(SCORES, jnp.array([1, 2, 3]))
