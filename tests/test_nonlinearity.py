"""Properties of squash, safe_norm and capsule_lengths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import capsjax
from capsjax.nonlinearity import capsule_lengths, safe_norm, squash


def _random_vectors(shape, scale=3.0, seed=0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def test_lengths_are_in_unit_interval():
  vectors = jnp.concatenate([
      _random_vectors((64, 16), scale=0.01),
      _random_vectors((64, 16), scale=100.0, seed=1),
      jnp.zeros((1, 16)),
  ])
  lengths = jnp.linalg.norm(squash(vectors), axis=-1)
  chex.assert_tree_all_finite(lengths)
  assert bool(jnp.all(lengths >= 0.0)) and bool(jnp.all(lengths < 1.0))


def test_length_follows_the_paper_formula():
  vectors = _random_vectors((32, 8))
  norms = jnp.linalg.norm(vectors, axis=-1)
  chex.assert_trees_all_close(
      jnp.linalg.norm(squash(vectors), axis=-1),
      norms**2 / (1 + norms**2),
      rtol=1e-5,
  )


def test_direction_is_kept():
  vectors = _random_vectors((32, 8))
  squashed = squash(vectors)
  cosine = jnp.sum(squashed * vectors, -1) / (
      jnp.linalg.norm(squashed, axis=-1) * jnp.linalg.norm(vectors, axis=-1)
  )
  chex.assert_trees_all_close(cosine, jnp.ones(32), atol=1e-5)


def test_zero_maps_to_zero_with_finite_gradient():
  zeros = jnp.zeros((4, 8))
  chex.assert_trees_all_equal(squash(zeros), zeros)
  gradient = jax.grad(lambda v: jnp.sum(squash(v)))(zeros)
  chex.assert_tree_all_finite(gradient)
  norm_gradient = jax.grad(lambda v: jnp.sum(safe_norm(v)))(zeros)
  chex.assert_tree_all_finite(norm_gradient)
  chex.assert_trees_all_equal(norm_gradient, zeros)


def test_jacobian_at_zero_is_finite():
  jacobian = jax.jacfwd(squash)(jnp.zeros(8))
  chex.assert_tree_all_finite(jacobian)


@pytest.mark.parametrize('axis', [0, 1, -1])
def test_axis_argument(axis):
  vectors = _random_vectors((5, 6, 7))
  moved = jnp.moveaxis(squash(jnp.moveaxis(vectors, axis, -1)), -1, axis)
  chex.assert_trees_all_close(squash(vectors, axis=axis), moved, rtol=1e-6)


def test_capsule_lengths_shape_and_value():
  capsules = _random_vectors((3, 10, 16))
  lengths = capsule_lengths(capsules)
  chex.assert_shape(lengths, (3, 10))
  np.testing.assert_allclose(
      lengths, np.linalg.norm(np.asarray(capsules), axis=-1), rtol=1e-5
  )


def test_exported_at_top_level():
  assert capsjax.squash is squash


@pytest.mark.parametrize('dtype, largest', [
    (jnp.float32, 3.4e38), (jnp.float32, 1e19), (jnp.float32, 1e-30),
    (jnp.float16, 6.5e4), (jnp.float16, 300.0), (jnp.bfloat16, 3.3e38),
])
def test_finite_value_and_gradient_for_any_finite_input(dtype, largest):
  # Squaring first overflowed: NaN from |s| ~ 1.8e19 in float32, ~ 256 in
  # float16.
  vectors = jnp.array([[largest, -largest / 2, largest / 4, 0.0],
                       [0.0, 0.0, 0.0, 0.0]], dtype)
  squashed = jax.jit(squash)(vectors)
  assert squashed.dtype == dtype
  chex.assert_tree_all_finite(squashed)
  lengths = jnp.linalg.norm(squashed.astype(jnp.float32), axis=-1)
  resolution = float(jnp.finfo(dtype).eps)
  assert bool(jnp.all(lengths <= 1 + 2 * resolution)), lengths
  # Direction kept: v is a positive multiple of s.
  expected = jnp.array([1.0, -0.5, 0.25, 0.0]) / jnp.sqrt(1 + 0.25 + 1 / 16)
  if largest >= 1:
    chex.assert_trees_all_close(squashed[0].astype(jnp.float32), expected,
                                atol=4 * resolution)
  chex.assert_trees_all_equal(squashed[1], jnp.zeros(4, dtype))
  gradient = jax.jit(jax.grad(
      lambda v: jnp.sum(squash(v).astype(jnp.float32))))(vectors)
  chex.assert_tree_all_finite(gradient)


def test_gradient_equals_the_plain_formula_in_its_range():
  vectors = _random_vectors((64, 8)) * jnp.logspace(-3, 3, 64)[:, None]

  def plain(vectors):
    squared = jnp.sum(jnp.square(vectors), -1, keepdims=True)
    return squared / (1 + squared) / jnp.sqrt(squared + 1e-9) * vectors

  weights = _random_vectors((64, 8), seed=2)
  chex.assert_trees_all_close(squash(vectors), plain(vectors), atol=1e-6)
  chex.assert_trees_all_close(
      jax.grad(lambda v: jnp.sum(weights * squash(v)))(vectors),
      jax.grad(lambda v: jnp.sum(weights * plain(v)))(vectors),
      rtol=1e-4, atol=1e-6)
