"""capsjax.routing inside a user's own linen model of another shape."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import capsjax
from capsjax import routing


class FiftyToThree(nn.Module):
  """Dense features -> 50 capsules of 4D -> routed to 3 capsules of 6D."""

  @nn.compact
  def __call__(self, inputs):
    capsules = capsjax.squash(nn.Dense(50 * 4)(inputs).reshape(-1, 50, 4))
    weights = self.param(
        'weights', nn.initializers.normal(0.1), (50, 3, 4, 6)
    )
    u_hat = routing.prediction_vectors(capsules, weights)
    return capsjax.capsule_lengths(routing.dynamic_routing(u_hat, 3))


def test_routing_trains_in_another_model():
  inputs = jax.random.normal(jax.random.key(0), (32, 12))
  labels = jnp.argmax(inputs[:, :3], axis=-1)  # a learnable 3-class rule
  model = FiftyToThree()
  params = model.init(jax.random.key(1), inputs)
  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)

  def loss_fn(params):
    lengths = model.apply(params, inputs)
    chex.assert_shape(lengths, (32, 3))
    return jnp.mean(
        capsjax.losses.margin_loss(lengths, jax.nn.one_hot(labels, 3))
    )

  @jax.jit
  def step(params, state):
    loss, gradients = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(gradients, state, params)
    return optax.apply_updates(params, updates), state, loss

  history = []
  for _ in range(30):
    params, state, loss = step(params, state)
    history.append(float(loss))
  assert all(jnp.isfinite(jnp.array(history)))
  assert history[-1] < 0.5 * history[0], history
