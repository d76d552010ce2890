"""Properties of prediction vectors and routing by agreement (Procedure 1)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capsjax import routing
from capsjax import squash


def _u_hat(batch=4, in_capsules=12, out_capsules=5, dim=6, seed=0, scale=0.5):
  return scale * jax.random.normal(
      jax.random.key(seed), (batch, in_capsules, out_capsules, dim)
  )


def _procedure_1_loops(u_hat, num_iterations):
  """The paper's Procedure 1, transcribed with Python loops for one example."""
  in_capsules, out_capsules, dim = u_hat.shape
  logits = np.zeros((in_capsules, out_capsules), np.float64)
  for iteration in range(num_iterations):
    coupling = np.zeros_like(logits)
    for i in range(in_capsules):
      exp = np.exp(logits[i] - logits[i].max())
      coupling[i] = exp / exp.sum()
    parents = np.zeros((out_capsules, dim))
    for j in range(out_capsules):
      s = sum(coupling[i, j] * u_hat[i, j] for i in range(in_capsules))
      squared = float(np.dot(s, s))
      parents[j] = squared / (1 + squared) * s / np.sqrt(squared)
    if iteration < num_iterations - 1:
      for i in range(in_capsules):
        for j in range(out_capsules):
          logits[i, j] += np.dot(u_hat[i, j], parents[j])
  return parents, coupling


@pytest.mark.parametrize('num_iterations', [1, 2, 3, 5])
def test_matches_python_loop_transcription(num_iterations):
  u_hat = _u_hat(batch=3, in_capsules=7, out_capsules=4, dim=5)
  parents, coupling = routing.dynamic_routing(
      u_hat, num_iterations, return_coupling=True
  )
  for example in range(u_hat.shape[0]):
    expected_parents, expected_coupling = _procedure_1_loops(
        np.asarray(u_hat[example], np.float64), num_iterations
    )
    np.testing.assert_allclose(parents[example], expected_parents, atol=1e-5)
    np.testing.assert_allclose(coupling[example], expected_coupling, atol=1e-5)


def test_output_shapes():
  u_hat = _u_hat(batch=2, in_capsules=9, out_capsules=3, dim=4)
  parents, coupling = routing.dynamic_routing(u_hat, 3, return_coupling=True)
  chex.assert_shape(parents, (2, 3, 4))
  chex.assert_shape(coupling, (2, 9, 3))


@pytest.mark.parametrize('num_iterations', [1, 3])
def test_coupling_sums_to_one_over_parents(num_iterations):
  _, coupling = routing.dynamic_routing(
      _u_hat(scale=3.0), num_iterations, return_coupling=True
  )
  chex.assert_trees_all_close(
      jnp.sum(coupling, axis=-1), jnp.ones(coupling.shape[:2]), atol=1e-6
  )
  assert bool(jnp.all(coupling >= 0))


def test_one_iteration_gives_uniform_coupling():
  u_hat = _u_hat(out_capsules=5)
  parents, coupling = routing.dynamic_routing(u_hat, 1, return_coupling=True)
  chex.assert_trees_all_close(coupling, jnp.full(coupling.shape, 0.2))
  # c = 1 / out_capsules, so s[j] = sum_i u_hat[j|i] / out_capsules.
  chex.assert_trees_all_close(
      parents, squash(jnp.sum(u_hat, axis=1) / 5), rtol=1e-5, atol=1e-6
  )


def test_more_iterations_concentrate_coupling_on_agreement():
  """Inputs that all predict parent 0 strongly should couple to it."""
  agreeing = jnp.zeros((1, 16, 3, 4)).at[:, :, 0, :].set(1.0)
  _, coupling = routing.dynamic_routing(agreeing, 3, return_coupling=True)
  assert bool(jnp.all(coupling[..., 0] > 1.0 / 3.0))


def test_example_routed_alone_equals_routed_in_a_batch():
  batch = _u_hat(batch=65, in_capsules=32, out_capsules=10, dim=16, scale=1.0)
  routed_in_batch = routing.dynamic_routing(batch, 3)
  for example in (0, 31, 64):
    routed_alone = routing.dynamic_routing(batch[example : example + 1], 3)
    chex.assert_trees_all_close(
        routed_alone[0], routed_in_batch[example], rtol=1e-6, atol=1e-7
    )


def test_other_examples_do_not_change_a_prediction():
  batch = _u_hat(batch=8, scale=1.0)
  other = batch.at[1:].set(_u_hat(batch=7, scale=5.0, seed=1))
  chex.assert_trees_all_close(
      routing.dynamic_routing(batch, 3)[0], routing.dynamic_routing(other, 3)[0]
  )


def test_jit_and_eager_agree():
  u_hat = _u_hat()
  with jax.disable_jit():
    eager = routing.dynamic_routing(u_hat, 3)
  chex.assert_trees_all_close(eager, routing.dynamic_routing(u_hat, 3), atol=1e-6)


@pytest.mark.parametrize('stop_gradient_intermediate', [False, True])
def test_gradients_are_finite_including_at_zero(stop_gradient_intermediate):
  def loss(u_hat):
    return jnp.sum(
        routing.dynamic_routing(
            u_hat, 3, stop_gradient_intermediate=stop_gradient_intermediate
        )
    )

  for u_hat in (_u_hat(), jnp.zeros((2, 5, 3, 4))):
    gradient = jax.grad(loss)(u_hat)
    chex.assert_tree_all_finite(gradient)
    chex.assert_shape(gradient, u_hat.shape)


def test_stop_gradient_changes_gradient_not_value():
  u_hat = _u_hat(scale=2.0)
  loss = lambda u, stop: jnp.sum(
      routing.dynamic_routing(u, 3, stop_gradient_intermediate=stop) ** 2
  )
  chex.assert_trees_all_close(
      routing.dynamic_routing(u_hat, 3),
      routing.dynamic_routing(u_hat, 3, stop_gradient_intermediate=True),
  )
  full = jax.grad(loss)(u_hat, False)
  stopped = jax.grad(loss)(u_hat, True)
  assert not np.allclose(full, stopped)
  # With one iteration there is nothing to stop.
  chex.assert_trees_all_close(
      jax.grad(lambda u: jnp.sum(routing.dynamic_routing(u, 1) ** 2))(u_hat),
      jax.grad(
          lambda u: jnp.sum(
              routing.dynamic_routing(u, 1, stop_gradient_intermediate=True)
              ** 2
          )
      )(u_hat),
  )


def test_prediction_vectors_are_per_pair_matrix_products():
  inputs = jax.random.normal(jax.random.key(0), (2, 6, 8))
  weights = jax.random.normal(jax.random.key(1), (6, 3, 8, 16))
  u_hat = routing.prediction_vectors(inputs, weights)
  chex.assert_shape(u_hat, (2, 6, 3, 16))
  np.testing.assert_allclose(
      u_hat[1, 4, 2], np.asarray(inputs[1, 4]) @ np.asarray(weights[4, 2]),
      rtol=1e-5, atol=1e-5,
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_prediction_vector_gradients_are_autodiffs(dtype):
  # The backward pass is written out (for XLA:CPU's layouts); it must be the
  # derivative of the einsum, in each compute dtype.
  inputs = jax.random.normal(jax.random.key(0), (3, 5, 4)).astype(dtype)
  weights = jax.random.normal(jax.random.key(1), (5, 2, 4, 6)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(2), (3, 5, 2, 6)).astype(dtype)

  def gradients(transform):
    return jax.vjp(transform, inputs, weights)[1](cotangent)

  ours = gradients(routing.prediction_vectors)
  expected = gradients(
      lambda u, w: jnp.einsum('bik,ijkd->bijd', u, w))
  chex.assert_trees_all_equal_dtypes(ours, expected)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), ours),
      jax.tree.map(lambda x: x.astype(jnp.float32), expected),
      rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
      atol=1e-2 if dtype == jnp.bfloat16 else 1e-5)
  jax.test_util.check_grads(routing.prediction_vectors,
                            (inputs.astype(jnp.float32),
                             weights.astype(jnp.float32)),
                            order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_bad_arguments_name_the_problem():
  with pytest.raises(ValueError, match='num_iterations must be >= 1'):
    routing.dynamic_routing(_u_hat(), 0)
  with pytest.raises(TypeError, match='num_iterations'):
    routing.dynamic_routing(_u_hat(), 2.0)
  with pytest.raises(ValueError, match='u_hat must be'):
    routing.dynamic_routing(jnp.zeros((3, 4, 5)), 3)
  with pytest.raises(ValueError, match='do not match'):
    routing.prediction_vectors(jnp.zeros((2, 6, 8)), jnp.zeros((5, 3, 8, 16)))
