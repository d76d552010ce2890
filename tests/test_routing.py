"""Properties of prediction vectors and routing by agreement (Procedure 1)."""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from capsjax import routing
from capsjax import squash


def _u_hat(batch=4, in_capsules=12, out_capsules=5, dim=6, seed=0, scale=0.5):
  return scale * jax.random.normal(
      jax.random.key(seed), (batch, in_capsules, out_capsules, dim)
  )


def _procedure_1_loops(u_hat, num_iterations, bias=None):
  """The paper's Procedure 1, transcribed with Python loops for one example
  (with the official code's bias added to s[j] where one is given)."""
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
      if bias is not None:
        s = s + bias[j]
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


@pytest.mark.parametrize('num_iterations', [1, 3])
def test_bias_matches_python_loop_transcription(num_iterations):
  u_hat = _u_hat(batch=3, in_capsules=7, out_capsules=4, dim=5)
  bias = 0.3 * jax.random.normal(jax.random.key(7), (4, 5))
  parents, coupling = routing.dynamic_routing(
      u_hat, num_iterations, return_coupling=True, bias=bias)
  chex.assert_trees_all_close(coupling.sum(-1), jnp.ones((3, 7)), atol=1e-6)
  for example in range(u_hat.shape[0]):
    expected_parents, expected_coupling = _procedure_1_loops(
        np.asarray(u_hat[example], np.float64), num_iterations,
        np.asarray(bias, np.float64))
    np.testing.assert_allclose(parents[example], expected_parents, atol=1e-5)
    np.testing.assert_allclose(coupling[example], expected_coupling, atol=1e-5)
  # The bias is shared, not mapped over the batch: an example routed alone
  # gets the same output.
  alone = routing.dynamic_routing(u_hat[1:2], num_iterations, bias=bias)
  chex.assert_trees_all_close(alone[0], parents[1], atol=1e-6)


def test_bias_gradient_is_finite_at_zero_and_bad_shape_is_an_error():
  u_hat = jnp.zeros((2, 6, 3, 4))

  def loss(u_hat, bias):
    return jnp.sum(routing.dynamic_routing(u_hat, 3, bias=bias))

  gradients = jax.grad(loss, argnums=(0, 1))(u_hat, jnp.zeros((3, 4)))
  chex.assert_tree_all_finite(gradients)
  # Zero votes and a zero bias: s = 0, where |s| has no derivative.
  with pytest.raises(ValueError, match=r'bias must be \(out_capsules, dim\)'):
    routing.dynamic_routing(u_hat, 3, bias=jnp.zeros((4, 3)))


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
def test_prediction_vectors_equal_the_einsum_in_each_dtype(dtype):
  # Computed as in_dim multiply-adds in float32, returned in the dtype.
  inputs, weights = _inputs_and_weights(dtype)
  u_hat = routing.prediction_vectors(inputs, weights)
  expected = jnp.einsum('bik,ijkd->bijd', inputs.astype(jnp.float32),
                        weights.astype(jnp.float32))
  assert u_hat.dtype == dtype
  chex.assert_trees_all_close(
      u_hat.astype(jnp.float32), expected,
      rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6,
      atol=1e-2 if dtype == jnp.bfloat16 else 1e-5)


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


# ---------------------------------------------------------------------------
# The routing library: every algorithm behind `route`.

IN_CAPSULES, OUT_CAPSULES, DIM = 6, 3, 4


def _route(algorithm, votes, activations=None, **kwargs):
  """`route` with the learned arrays each algorithm needs (fixed values)."""
  if algorithm == 'em':
    kwargs.setdefault('beta_u', jnp.linspace(-0.5, 0.5, OUT_CAPSULES))
    kwargs.setdefault('beta_a', jnp.linspace(0.5, -0.5, OUT_CAPSULES))
    if activations is None:
      activations = jnp.full(votes.shape[:2], 0.7, votes.dtype)
  if algorithm == 'self_attention':
    kwargs.setdefault('log_priors',
                      0.1 * jnp.ones((votes.shape[1], OUT_CAPSULES)))
  return routing.route(algorithm, votes, activations, **kwargs)


def _votes(batch=4, seed=0, scale=0.5):
  return _u_hat(batch, IN_CAPSULES, OUT_CAPSULES, DIM, seed, scale)


@pytest.mark.parametrize('algorithm', routing.ALGORITHMS)
def test_every_algorithm_normalises_coupling_and_bounds_activations(algorithm):
  output = _route(algorithm, _votes(scale=2.0), return_coupling=True)
  chex.assert_shape(output.poses, (4, OUT_CAPSULES, DIM))
  chex.assert_shape(output.activations, (4, OUT_CAPSULES))
  chex.assert_shape(output.coupling, (4, IN_CAPSULES, OUT_CAPSULES))
  chex.assert_trees_all_close(jnp.sum(output.coupling, axis=-1),
                              jnp.ones((4, IN_CAPSULES)), atol=1e-6)
  assert bool(jnp.all(output.coupling >= 0))
  assert bool(jnp.all((output.activations > 0) & (output.activations < 1)))
  assert _route(algorithm, _votes()).coupling is None


@pytest.mark.parametrize('algorithm', routing.ALGORITHMS)
def test_every_algorithm_routes_each_example_alone(algorithm):
  votes = _votes(batch=4, scale=1.0)
  other = votes.at[1:].set(_votes(batch=3, seed=1, scale=5.0))
  in_batch = _route(algorithm, votes)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[0], in_batch),
      jax.tree.map(lambda x: x[0], _route(algorithm, other)), atol=1e-6)


@pytest.mark.parametrize('algorithm', routing.ALGORITHMS)
def test_values_and_gradients_finite_at_zero_and_for_huge_votes(algorithm):
  def loss(votes):
    output = _route(algorithm, votes)
    return jnp.sum(output.poses) + jnp.sum(output.activations)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  for votes in (jnp.zeros_like(_votes()), 1e6 * _votes()):
    value, gradient = value_and_grad(votes)
    chex.assert_tree_all_finite((value, gradient))


@pytest.mark.parametrize('algorithm', routing.ALGORITHMS)
def test_check_grads_second_order_forward_and_reverse(algorithm):
  # Two iterations: dynamic routing's loop then runs once. From r = 3 on its
  # second derivatives are off (see routing._route_one_example).
  # Eagerly: compiling each transformed program of the routing costs minutes
  # on a small CPU; op by op it is seconds.
  with jax.enable_x64(True), jax.disable_jit():
    # One example (batch independence is tested above): half the ops.
    votes = _votes(batch=1).astype(jnp.float64)

    def routed(votes):
      output = _route(algorithm, votes, num_iterations=2)
      return output.poses, output.activations

    jax.test_util.check_grads(routed, (votes,), order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('algorithm', routing.ALGORITHMS)
def test_float64_stays_float64_and_bfloat16_routes_in_float32(algorithm):
  with jax.enable_x64(True):
    output = _route(algorithm, _votes().astype(jnp.float64),
                    return_coupling=True)
    chex.assert_trees_all_equal_dtypes(
        output, jax.tree.map(lambda x: x.astype(jnp.float64), output))
  output = _route(algorithm, _votes().astype(jnp.bfloat16))
  assert output.poses.dtype == output.activations.dtype == jnp.float32


def test_no_routing_is_dynamic_routing_with_one_iteration():
  votes = _votes()
  chex.assert_trees_all_close(
      routing.no_routing(votes).poses, routing.dynamic_routing(votes, 1),
      atol=1e-7)
  # Input activations weight each vote: an absent input adds nothing.
  activations = jnp.ones(votes.shape[:2]).at[:, 0].set(0.0)
  chex.assert_trees_all_close(
      routing.no_routing(votes, activations).poses,
      squash(jnp.sum(votes[:, 1:], axis=1) / OUT_CAPSULES), atol=1e-6)


def _self_attention_loops(votes, log_priors):
  """Efficient-CapsNet's routing for one example, with A_j written out."""
  in_capsules, out_capsules, dim = votes.shape
  logits = np.zeros((in_capsules, out_capsules))
  for j in range(out_capsules):
    attention = votes[:, j] @ votes[:, j].T / np.sqrt(dim)  # A_j
    logits[:, j] = attention.sum(axis=1)
  coupling = np.exp(logits - logits.max(axis=1, keepdims=True))
  coupling /= coupling.sum(axis=1, keepdims=True)  # softmax over outputs
  parents = np.zeros((out_capsules, dim))
  for j in range(out_capsules):
    s = sum((coupling[i, j] + log_priors[i, j]) * votes[i, j]
            for i in range(in_capsules))
    norm = np.linalg.norm(s)
    parents[j] = (1 - np.exp(-norm)) * s / norm
  return parents, coupling


def test_self_attention_matches_loop_transcription():
  votes = _votes(batch=2)
  log_priors = 0.1 * jax.random.normal(jax.random.key(3),
                                       (IN_CAPSULES, OUT_CAPSULES))
  output = routing.self_attention_routing(votes, log_priors,
                                          return_coupling=True)
  for example in range(2):
    parents, coupling = _self_attention_loops(
        np.asarray(votes[example], np.float64), np.asarray(log_priors))
    np.testing.assert_allclose(output.poses[example], parents, atol=1e-5)
    np.testing.assert_allclose(output.coupling[example], coupling, atol=1e-5)


def _em_loops(votes, activations, beta_u, beta_a, inverse_temperatures,
              normalize_cost, epsilon=routing.EM_EPSILON):
  """Procedure 1 of matrix capsules for one example, with Python loops."""
  in_capsules, out_capsules, pose_size = votes.shape
  assignment = np.full((in_capsules, out_capsules), 1.0 / out_capsules)
  for t, inverse_temperature in enumerate(inverse_temperatures):
    means = np.zeros((out_capsules, pose_size))
    variances = np.zeros((out_capsules, pose_size))
    for j in range(out_capsules):  # M-step
      r = [assignment[i, j] * activations[i] for i in range(in_capsules)]
      total = sum(r)
      for h in range(pose_size):
        means[j, h] = sum(r[i] * votes[i, j, h]
                          for i in range(in_capsules)) / (total + epsilon)
        variances[j, h] = sum(r[i] * (votes[i, j, h] - means[j, h])**2
                              for i in range(in_capsules)) / (total + epsilon)
        variances[j, h] += epsilon
    log_sigmas = np.log(np.sqrt(variances))
    if normalize_cost:
      log_sigmas -= np.mean(log_sigmas, axis=0)
    costs = np.zeros(out_capsules)
    for j in range(out_capsules):
      share = sum(assignment[i, j] * activations[i]
                  for i in range(in_capsules))
      if normalize_cost:
        share = share * out_capsules / in_capsules / pose_size
      costs[j] = sum((beta_u[j] + log_sigmas[j, h]) * share
                     for h in range(pose_size))
    out_activations = 1 / (1 + np.exp(-inverse_temperature * (beta_a - costs)))
    if t == len(inverse_temperatures) - 1:
      return means, out_activations, assignment
    for i in range(in_capsules):  # E-step
      p = np.array([
          np.prod([np.exp(-(votes[i, j, h] - means[j, h])**2
                          / (2 * variances[j, h]))
                   / np.sqrt(2 * np.pi * variances[j, h])
                   for h in range(pose_size)])
          for j in range(out_capsules)])
      assignment[i] = out_activations * p / np.sum(out_activations * p)


@pytest.mark.parametrize('normalize_cost', [True, False])
def test_em_matches_loop_transcription(normalize_cost):
  votes = _votes(batch=2)
  activations = jax.random.uniform(jax.random.key(4), (2, IN_CAPSULES))
  beta_u = jnp.array([0.1, -0.2, 0.3])
  beta_a = jnp.array([-0.1, 0.2, 0.0])
  temperatures = (0.5, 1.0, 2.0)
  output = routing.em_routing(
      votes, activations, beta_u, beta_a, num_iterations=3,
      inverse_temperatures=temperatures, normalize_cost=normalize_cost,
      return_coupling=True)
  for example in range(2):
    means, out_activations, assignment = _em_loops(
        np.asarray(votes[example], np.float64),
        np.asarray(activations[example], np.float64), np.asarray(beta_u),
        np.asarray(beta_a), temperatures, normalize_cost)
    np.testing.assert_allclose(output.poses[example], means, atol=1e-5)
    np.testing.assert_allclose(output.activations[example], out_activations,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(output.coupling[example], assignment,
                               atol=1e-5)


def test_em_input_activations_are_not_cancelled():
  """R_ij a_i is not renormalised over outputs (a bug of popular ports):
  an absent input has no say in the output poses, and scaling every input's
  activation changes the output activations."""
  votes = _votes(batch=1)
  kwargs = dict(beta_u=jnp.zeros(OUT_CAPSULES), beta_a=jnp.zeros(OUT_CAPSULES))
  present = jnp.ones((1, IN_CAPSULES))
  absent_first = present.at[0, 0].set(0.0)
  moved = votes.at[0, 0].add(10.0)
  chex.assert_trees_all_close(
      routing.em_routing(votes, absent_first, **kwargs).poses,
      routing.em_routing(moved, absent_first, **kwargs).poses, atol=1e-5)
  assert not np.allclose(
      routing.em_routing(votes, present, **kwargs).activations,
      routing.em_routing(votes, 0.2 * present, **kwargs).activations)


def test_em_normalised_cost_does_not_saturate_with_many_inputs():
  votes = _votes(batch=1)
  activations = jnp.ones((1, IN_CAPSULES))
  kwargs = dict(beta_u=jnp.zeros(OUT_CAPSULES), beta_a=jnp.zeros(OUT_CAPSULES),
                inverse_temperatures=(1.0, 1.0, 1.0))
  # Each input capsule 50 times: the normalised cost is unchanged ...
  many = jnp.repeat(votes, 50, axis=1)
  many_activations = jnp.repeat(activations, 50, axis=1)
  few_output = routing.em_routing(votes, activations, **kwargs)
  many_output = routing.em_routing(many, many_activations, **kwargs)
  chex.assert_trees_all_close(few_output, many_output, rtol=1e-4, atol=1e-6)
  assert bool(jnp.all((many_output.activations > 0.01)
                      & (many_output.activations < 0.99)))
  # ... while the paper's cost, as written, drives the logistic to 1.
  paper = routing.em_routing(many, many_activations, normalize_cost=False,
                             **kwargs)
  assert bool(jnp.all(paper.activations > 0.999))


def test_em_normalised_cost_does_not_saturate_with_small_votes():
  """A fresh network's votes are small, their variances tiny and log sigma
  very negative: with log sigma relative to the parents' mean, routing does
  not depend on the votes' scale (while the variance stays well above
  epsilon), and the activations stay off 1."""
  votes = 3.0 * _votes(batch=1)
  activations = jnp.ones((1, IN_CAPSULES))
  kwargs = dict(beta_u=jnp.zeros(OUT_CAPSULES), beta_a=jnp.zeros(OUT_CAPSULES))
  large = routing.em_routing(votes, activations, **kwargs)
  small = routing.em_routing(1e-2 * votes, activations, **kwargs)
  chex.assert_trees_all_close(small.activations, large.activations,
                              atol=1e-4)
  chex.assert_trees_all_close(small.poses, 1e-2 * large.poses, atol=1e-6)
  assert bool(jnp.all((small.activations > 0.01)
                      & (small.activations < 0.99)))
  paper = routing.em_routing(1e-2 * votes, activations, normalize_cost=False,
                             **kwargs)
  assert bool(jnp.all(paper.activations > 0.99))


def test_inverse_temperature_schedule_rises_to_final():
  schedule = routing.inverse_temperature_schedule(3, final=0.5)
  np.testing.assert_allclose(schedule[-1], 0.5, rtol=1e-6)
  assert bool(jnp.all(jnp.diff(schedule) > 0))


def test_route_rejects_what_an_algorithm_cannot_use():
  with pytest.raises(ValueError, match='unknown routing algorithm'):
    routing.route('k_means', _votes())
  with pytest.raises(ValueError, match='takes no activations'):
    routing.route('dynamic', _votes(), jnp.ones((4, IN_CAPSULES)))
  with pytest.raises(ValueError, match='needs the input activations'):
    routing.route('em', _votes(), beta_u=jnp.zeros(3), beta_a=jnp.zeros(3))


def test_route_dynamic_is_dynamic_routing():
  votes = _votes()
  output = routing.route('dynamic', votes, num_iterations=2,
                         return_coupling=True)
  parents, coupling = routing.dynamic_routing(votes, 2, return_coupling=True)
  chex.assert_trees_all_close((output.poses, output.coupling),
                              (parents, coupling))
  chex.assert_trees_all_close(output.activations,
                              jnp.linalg.norm(parents, axis=-1), atol=1e-5)


# ---------------------------------------------------------------------------
# prediction_vectors: forward mode, vmap, dtypes.


def _inputs_and_weights(dtype=jnp.float32):
  inputs = jax.random.normal(jax.random.key(0), (3, 5, 4)).astype(dtype)
  weights = jax.random.normal(jax.random.key(1), (5, 2, 4, 6)).astype(dtype)
  return inputs, weights


def test_prediction_vectors_check_grads_second_order_both_modes():
  with jax.enable_x64(True), jax.disable_jit():
    inputs, weights = _inputs_and_weights(jnp.float64)
    jax.test_util.check_grads(
        lambda u, w: jnp.sin(routing.prediction_vectors(u, w)),
        (inputs, weights), order=2, modes=('fwd', 'rev'))


def test_prediction_vectors_forward_mode_matches_the_einsum():
  inputs, weights = _inputs_and_weights()
  einsum = lambda u, w: jnp.einsum('bik,ijkd->bijd', u, w)
  tangents = (jnp.ones_like(inputs), 0.5 * jnp.ones_like(weights))
  chex.assert_trees_all_close(
      jax.jvp(routing.prediction_vectors, (inputs, weights), tangents),
      jax.jvp(einsum, (inputs, weights), tangents), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(
      jax.jacfwd(routing.prediction_vectors)(inputs, weights),
      jax.jacrev(routing.prediction_vectors)(inputs, weights), atol=1e-6)
  quadratic = lambda u: jnp.sum(routing.prediction_vectors(u, weights)**2)
  chex.assert_trees_all_close(
      jax.hessian(quadratic)(inputs),
      jax.hessian(lambda u: jnp.sum(einsum(u, weights)**2))(inputs),
      rtol=1e-4, atol=1e-4)


def test_prediction_vectors_vmap_over_inputs_and_weights():
  inputs, weights = _inputs_and_weights()
  stacked_inputs = jnp.stack([inputs, 2 * inputs])
  stacked_weights = jnp.stack([weights, -weights])
  expected = jnp.stack([routing.prediction_vectors(inputs, weights),
                        routing.prediction_vectors(2 * inputs, -weights)])
  chex.assert_trees_all_close(
      jax.vmap(routing.prediction_vectors)(stacked_inputs, stacked_weights),
      expected, atol=1e-5)
  chex.assert_trees_all_close(
      jax.vmap(routing.prediction_vectors, (0, None))(stacked_inputs, weights),
      jnp.stack([expected[0], 2 * expected[0]]), atol=1e-5)


def test_mixed_dtype_gradients_come_back_in_each_primal_dtype():
  with jax.enable_x64(True):
    inputs, weights = _inputs_and_weights()
    u_hat = routing.prediction_vectors(inputs, weights.astype(jnp.float64))
    assert u_hat.dtype == jnp.float64
    gradients = jax.grad(
        lambda u, w: jnp.sum(routing.dynamic_routing(
            routing.prediction_vectors(u, w), 2)),
        argnums=(0, 1))(inputs, weights.astype(jnp.float64))
    assert gradients[0].dtype == jnp.float32
    assert gradients[1].dtype == jnp.float64
