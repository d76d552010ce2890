"""Classification metrics over class scores, for one or several labels.

Pure functions of per-class scores (capsule lengths, or logits: only their
order matters), each returning one value per example (no reduction), like
`capsjax.losses`.

MultiMNIST (paper, section 6): an example holds two digits of different
classes and is right only when its two longest capsules are exactly its two
labels, in any order: `multi_label_accuracy(lengths, labels)` with labels of
shape `(batch, 2)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_classes(scores: jax.Array, k: int) -> jax.Array:
  """The k highest-scoring classes of each example, best first.

  >>> import jax.numpy as jnp
  >>> scores = jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.7]])
  >>> top_k_classes(scores, 2).tolist()  # the tie in row 2: class 0 first
  [[1, 2], [0, 2]]

  Args:
    scores: `(batch, classes)`.
    k: how many, 1 <= k <= classes.

  Returns:
    `(batch, k)` int32 class indices. Ties go to the lower class index.
  """
  if not 1 <= k <= scores.shape[-1]:
    raise ValueError(f'k={k} must be in [1, {scores.shape[-1]}]')
  _, classes = jax.lax.top_k(scores, k)
  return classes.astype(jnp.int32)


def multi_hot(labels: jax.Array, num_classes: int,
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Labels `(batch,)` or `(batch, k)` -> `(batch, num_classes)` 0/1 targets.

  A class listed twice in a row still gives 1 (not 2), so the result is a
  valid margin-loss target `T_k` for `capsjax.losses.margin_loss`.

  >>> import jax.numpy as jnp
  >>> multi_hot(jnp.array([[0, 2], [1, 1]]), 3).tolist()
  [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
  >>> multi_hot(jnp.array([2, 0]), 3).tolist()
  [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
  """
  if labels.ndim == 1:
    labels = labels[:, None]
  one_hots = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return jnp.max(one_hots, axis=-2)


def top_k_multi_hot(scores: jax.Array, k: int) -> jax.Array:
  """`(batch, classes)` with 1 at each example's k highest scores, else 0.

  >>> import jax.numpy as jnp
  >>> top_k_multi_hot(jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6]]), 2).tolist()
  [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
  """
  return multi_hot(top_k_classes(scores, k), scores.shape[-1])


def accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the highest score is the label: `(batch,)` float32.

  >>> import jax.numpy as jnp
  >>> scores = jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6]])
  >>> accuracy(scores, jnp.array([1, 2])).tolist()
  [1.0, 0.0]
  """
  return (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32)


def top_k_accuracy(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label `(batch,)` is among the k highest scores.

  >>> import jax.numpy as jnp
  >>> scores = jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6]])
  >>> top_k_accuracy(scores, jnp.array([2, 1]), k=2).tolist()
  [1.0, 0.0]
  """
  hits = top_k_classes(scores, k) == labels[:, None]
  return jnp.any(hits, axis=-1).astype(jnp.float32)


def multi_label_accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the k highest scores are exactly the k labels, in any order.

  >>> import jax.numpy as jnp
  >>> lengths = jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6]])
  >>> multi_label_accuracy(lengths, jnp.array([[2, 1], [0, 1]])).tolist()
  [1.0, 0.0]

  Args:
    scores: `(batch, classes)`, e.g. capsule lengths.
    labels: `(batch, k)` distinct classes per example (for MultiMNIST, k = 2
      digits of different classes). An example whose labels repeat a class
      can never be right, since the k highest scores are k distinct classes.

  Returns:
    `(batch,)` float32: the paper's MultiMNIST accuracy for k = 2.
  """
  if labels.ndim != 2:
    raise ValueError(f'labels must be (batch, k), got shape {labels.shape}')
  predicted = top_k_multi_hot(scores, labels.shape[-1])
  # Compare as 0/1 vectors so a repeated label (one 1) never matches k ones.
  wanted = jnp.sum(jax.nn.one_hot(labels, scores.shape[-1]), axis=-2)
  return jnp.all(predicted == wanted, axis=-1).astype(jnp.float32)


def per_label_accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of an example's k labels that are among its k highest scores.

  `(batch,)` float32 in {0, 1/k, ..., 1}; a softer MultiMNIST metric.

  >>> import jax.numpy as jnp
  >>> lengths = jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6]])
  >>> per_label_accuracy(lengths, jnp.array([[2, 1], [0, 1]])).tolist()
  [1.0, 0.5]
  """
  if labels.ndim != 2:
    raise ValueError(f'labels must be (batch, k), got shape {labels.shape}')
  top = top_k_classes(scores, labels.shape[-1])
  found = jnp.any(labels[:, :, None] == top[:, None, :], axis=-1)
  return jnp.mean(found.astype(jnp.float32), axis=-1)
