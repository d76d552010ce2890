"""Capsule vector maths: a safe Euclidean norm and the squash non-linearity.

Sabour, Frosst & Hinton (2017), eq. 1:

    v = squash(s) = |s|^2 / (1 + |s|^2) * s / |s|

A capsule's length is the probability that its entity is present, so squash
maps every vector to a length in [0, 1) (up to rounding, see `squash`) and
keeps its direction.
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

  Value and gradient are finite for every finite input in every float
  dtype: `s` is divided by its largest component m before anything is
  squared (the formula is unchanged by that: |s|^2 = m^2 |s/m|^2), so
  |s|^2 never overflows (float32 from |s| ~ 1.8e19, float16 from ~ 256).

  >>> import jax.numpy as jnp
  >>> v = squash(jnp.array([3.0, 4.0]))  # |s| = 5: length 25 / 26
  >>> bool(jnp.allclose(jnp.linalg.norm(v), 25 / 26))
  True
  >>> bool(jnp.all(jnp.isfinite(squash(jnp.array([3e38, -3e38])))))
  True

  Args:
    vectors: `(..., dim)` capsule inputs s (any leading shape).
    axis: the axis holding the vector components.
    epsilon: keeps the norm's gradient finite at zero.

  Returns:
    Squashed vectors v, same shape and dtype as `vectors`. Their lengths are
    mathematically in [0, 1); computed, in [0, 1] up to the dtype's rounding:
    exactly 1.0 once 1 / |s|^2 is below the dtype's resolution (float32:
    |s| > ~4096), and in bfloat16 or float16 the rounded components can make
    the length a rounding error above 1.
  """
  # s = 2^e t with 2^e the power of two of the largest |component|: exact,
  # and unlike a division by the largest component it cannot make a
  # subnormal that the CPU flushes to zero. e is a constant for the chain
  # rule; the maths does not depend on it, so the gradient is exact.
  # float16 and bfloat16 are computed in float32: epsilon is 0 in float16.
  dtype = vectors.dtype
  vectors = vectors.astype(jnp.promote_types(dtype, jnp.float32))
  _, exponent = jnp.frexp(jax.lax.stop_gradient(
      jnp.max(jnp.abs(vectors), axis=axis, keepdims=True)))
  large = exponent > 0  # |s| >= 1/2 or so: the branch without overflow.
  scaled = jnp.ldexp(vectors, -exponent)
  scaled_squared_norm = jnp.sum(jnp.square(scaled), axis=axis, keepdims=True)
  # |s|^2 / (1 + |s|^2): as 1 / (1 + 1 / |s|^2) for large s (|s|^2 may
  # overflow), directly for small s (1 / |s|^2 may). Each branch is kept
  # finite everywhere, so the unused one's gradient is not NaN.
  squared_norm = jnp.ldexp(jnp.where(large, 0, scaled_squared_norm),
                           2 * exponent)
  inverse_squared_norm = jnp.ldexp(
      1 / jnp.where(large, scaled_squared_norm, 1), -2 * exponent)
  squash_factor = jnp.where(large, 1 / (1 + inverse_squared_norm),
                            squared_norm / (1 + squared_norm))
  # s / sqrt(|s|^2 + epsilon) = t / sqrt(|t|^2 + epsilon / 4^e).
  direction = scaled / jnp.sqrt(
      scaled_squared_norm + jnp.ldexp(jnp.asarray(epsilon, vectors.dtype),
                                      -2 * exponent))
  return (squash_factor * direction).astype(dtype)


def capsule_lengths(
    capsules: jax.Array, epsilon: float = DEFAULT_EPSILON
) -> jax.Array:
  """Lengths of capsule vectors `(..., capsules, dim)` -> `(..., capsules)`.

  The length of a class capsule is the network's probability for the class.
  """
  return safe_norm(capsules, axis=-1, epsilon=epsilon)
