"""An exponential moving average of the parameters (Polyak averaging), kept
by an optax transformation chained after the optimizer.

    tx = optax.chain(optax.adam(schedule), parameter_average(0.999))
    ...
    averaged_parameters(state.opt_state, state.params)  # for evaluation

The average lives in the optimizer state, so it is checkpointed and
restored with the rest of the train state, and a run without it keeps the
plain optimizer state's layout. `train.models.variables` hands the average
to evaluation, checkpoint selection, the test and export when a run keeps
one (`config.parameter_average_decay > 0`); the optimizer still steps the
raw parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ParameterAverageState(NamedTuple):
  """`weighted_sum`: the zero-started average of the parameters;
  `total_weight`: the same average of the constant 1 (its bias)."""

  weighted_sum: optax.Params
  total_weight: jax.Array


def parameter_average(decay: float) -> optax.GradientTransformation:
  """Keeps an exponential moving average of the parameters after each
  update, and passes the updates on unchanged.

  With `p_t = p_{t-1} + u_t` the parameters after update t:

      s_t = decay * s_{t-1} + (1 - decay) * p_t,   s_0 = 0
      w_t = decay * w_{t-1} + (1 - decay),         w_0 = 0  (= 1 - decay^t)
      average_t = s_t / w_t

  so that the average weighs update t's parameters by
  `(1 - decay) * decay^(T - t) / w_T`, weights summing to one from the first
  step on (no pull toward the zero start, as Adam's moments are debiased).

  Args:
    decay: in [0, 1); 1 / (1 - decay) steps is the average's time constant.

  Returns:
    A transformation whose `update` needs `params` (those before the update).
  """
  if not 0 <= decay < 1:
    raise ValueError(f'decay {decay!r} must be in [0, 1)')

  # Kept in float32 whatever the parameters' dtype: in bfloat16, `decay *
  # total` with decay 0.999 would round back to `total`.
  def init_fn(params: optax.Params) -> ParameterAverageState:
    return ParameterAverageState(
        weighted_sum=jax.tree.map(
            lambda value: jnp.zeros_like(value, jnp.float32), params),
        total_weight=jnp.zeros([], jnp.float32))

  def update_fn(updates, state: ParameterAverageState, params=None):
    if params is None:
      raise ValueError('parameter_average needs the parameters: call '
                       'update(updates, state, params)')
    new_params = optax.apply_updates(params, updates)
    weighted_sum = jax.tree.map(
        lambda total, value: (decay * total +
                              (1 - decay) * value.astype(jnp.float32)),
        state.weighted_sum, new_params)
    total_weight = decay * state.total_weight + (1 - decay)
    return updates, ParameterAverageState(weighted_sum, total_weight)

  return optax.GradientTransformation(init_fn, update_fn)


def _average_states(opt_state: Any) -> list[ParameterAverageState]:
  return [node for node in jax.tree.leaves(
      opt_state, is_leaf=lambda node: isinstance(node, ParameterAverageState))
          if isinstance(node, ParameterAverageState)]


def averaged_parameters(opt_state: Any, params: optax.Params
                        ) -> optax.Params:
  """The average kept by a `parameter_average` in `opt_state`
  (`weighted_sum / total_weight`, in each parameter's dtype); `params`
  themselves where it keeps none, or before its first update (the average
  of the one set of parameters seen)."""
  states = _average_states(opt_state)
  if not states:
    return params
  if len(states) > 1:
    raise ValueError(f'the optimizer state holds {len(states)} parameter '
                     'averages; expected one')
  weighted_sum, total_weight = states[0]
  started = total_weight > 0
  divisor = jnp.where(started, total_weight, 1)
  return jax.tree.map(
      lambda total, value: jnp.where(started, total / divisor,
                                     value).astype(value.dtype),
      weighted_sum, params)
