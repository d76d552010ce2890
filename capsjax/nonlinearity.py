"""Capsule vector maths: a safe Euclidean norm and the squash non-linearity.

Sabour, Frosst & Hinton (2017), eq. 1:

    v = squash(s) = |s|^2 / (1 + |s|^2) * s / |s|

A capsule's length is the probability that its entity is present, so squash
maps every vector to a length in [0, 1) and keeps its direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Inside the square root, so that |s| and its gradient are finite at s = 0.
DEFAULT_EPSILON = 1e-9


def safe_norm(
    vectors: jax.Array,
    axis: int = -1,
    keepdims: bool = False,
    epsilon: float = DEFAULT_EPSILON,
) -> jax.Array:
  """Euclidean norm sqrt(sum(x^2) + epsilon), finite in value and gradient.

  The plain norm has gradient x / |x|, which is 0/0 = NaN at x = 0; the
  epsilon inside the root keeps it finite (the gradient at 0 is exactly 0).

  Args:
    vectors: any shape, e.g. capsules `(batch, capsules, dim)`.
    axis: the axis holding the vector components.
    keepdims: keep `axis` with size 1.
    epsilon: added to the squared norm before the square root.

  Returns:
    The norms, with `axis` removed unless `keepdims`.
  """
  squared = jnp.sum(jnp.square(vectors), axis=axis, keepdims=keepdims)
  return jnp.sqrt(squared + epsilon)


def squash(
    vectors: jax.Array, axis: int = -1, epsilon: float = DEFAULT_EPSILON
) -> jax.Array:
  """The capsule non-linearity, eq. 1 of the paper.

      squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + epsilon)

  Short vectors shrink to almost zero length, long ones to just below 1; the
  direction is kept. At s = 0 the value is 0 and the gradient is finite.

  Args:
    vectors: `(..., dim)` capsule inputs s (any leading shape).
    axis: the axis holding the vector components.
    epsilon: keeps the norm's gradient finite at zero.

  Returns:
    Squashed vectors v, same shape and dtype as `vectors`, with lengths in
    [0, 1).
  """
  squared_norm = jnp.sum(jnp.square(vectors), axis=axis, keepdims=True)
  scale = squared_norm / (1.0 + squared_norm) / jnp.sqrt(squared_norm + epsilon)
  return scale * vectors


def capsule_lengths(
    capsules: jax.Array, epsilon: float = DEFAULT_EPSILON
) -> jax.Array:
  """Lengths of capsule vectors `(..., capsules, dim)` -> `(..., capsules)`.

  The length of a class capsule is the network's probability for the class.
  """
  return safe_norm(capsules, axis=-1, epsilon=epsilon)
