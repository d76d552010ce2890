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

  >>> import jax.numpy as jnp
  >>> print(f"{float(safe_norm(jnp.array([3.0, 4.0]))):.4f}")
  5.0000
  >>> print(float(jax.grad(lambda v: safe_norm(v))(jnp.zeros(2))[0]))
  0.0

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
  dtype: a vector whose largest component m is at least 1 is first divided
  by c = min(m, 2^100) (the formula is unchanged by that: |s|^2 = c^2 |s/c|^2),
  so |s|^2 never overflows (float32 from |s| ~ 1.8e19, float16 from ~ 256);
  smaller vectors are computed as written above.

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
  # s = c t. c is a constant for the chain rule; the maths does not depend
  # on it, so the gradient is exact. Capped at 2^100 so that 1 / c is never
  # a subnormal, which the CPU flushes to zero.
  scale = jnp.clip(jax.lax.stop_gradient(
      jnp.max(jnp.abs(vectors), axis=axis, keepdims=True)), 1.0, 2.0**100)
  inverse_scale = 1 / scale
  scaled = vectors * inverse_scale
  scaled_squared_norm = jnp.sum(jnp.square(scaled), axis=axis, keepdims=True)
  # |s|^2 / (1 + |s|^2) and s / sqrt(|s|^2 + epsilon), both divided through
  # by c^2 (c = 1, the formula as written, for vectors shorter than ~1).
  inverse_scale_squared = jnp.square(inverse_scale)
  squash_factor = scaled_squared_norm / (inverse_scale_squared +
                                         scaled_squared_norm)
  direction = scaled / jnp.sqrt(scaled_squared_norm +
                                epsilon * inverse_scale_squared)
  return (squash_factor * direction).astype(dtype)


def capsule_lengths(
    capsules: jax.Array, epsilon: float = DEFAULT_EPSILON
) -> jax.Array:
  """Lengths of capsule vectors `(..., capsules, dim)` -> `(..., capsules)`.

  The length of a class capsule is the network's probability for the class.

  >>> import jax.numpy as jnp
  >>> capsule_lengths(jnp.ones((2, 10, 16))).shape
  (2, 10)
  """
  return safe_norm(capsules, axis=-1, epsilon=epsilon)
