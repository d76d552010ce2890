"""Tests of the parameters' moving average (train/averaging.py) and of its
use by training, evaluation and checkpoints."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import averaging
from train import checkpoints as checkpoints_lib
from train import config_checks
from train import models
from train import train

import multidevice_worker  # pylint: disable=g-bad-import-order
from test_train import SMALL  # pylint: disable=g-bad-import-order


def _params(seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {'kernel': jax.random.normal(keys[0], (3, 4)),
          'bias': {'value': jax.random.normal(keys[1], (4,))}}


def _run(transformation, params, updates_list):
  """The parameters after each update and the final optimizer state."""
  state = transformation.init(params)
  history = []
  for updates in updates_list:
    updates, state = transformation.update(updates, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


def _random_updates(count: int):
  return [_params(seed) for seed in range(100, 100 + count)]


def test_average_is_the_normalised_exponential_weighting():
  decay, steps = 0.8, 6
  history, state = _run(averaging.parameter_average(decay), _params(),
                        _random_updates(steps))
  weights = np.array([(1 - decay) * decay**(steps - 1 - index)
                      for index in range(steps)])
  chex.assert_trees_all_close(float(state.total_weight), weights.sum(),
                              rtol=1e-6)
  expected = jax.tree.map(
      lambda *leaves: sum(w * leaf for w, leaf in zip(weights, leaves))
      / weights.sum(), *history)
  chex.assert_trees_all_close(
      averaging.averaged_parameters(state, history[-1]), expected, rtol=1e-5,
      atol=1e-6)


def test_bfloat16_parameters_are_averaged_in_float32():
  """In bfloat16, 0.999 rounds to 1: the sum must not be kept in it."""
  decay, steps = 0.999, 100
  params = {'weight': jnp.zeros((4,), jnp.bfloat16)}
  transformation = averaging.parameter_average(decay)
  state = transformation.init(params)
  ones = {'weight': jnp.ones((4,), jnp.bfloat16)}
  # Step 1 moves the parameters from 0 to 1; they stay there.
  _, state = transformation.update(ones, state, params)
  for _ in range(steps - 1):
    _, state = transformation.update(
        {'weight': jnp.zeros((4,), jnp.bfloat16)}, state, ones)
  average = averaging.averaged_parameters(state, ones)
  chex.assert_type(average['weight'], jnp.bfloat16)
  # Every update's parameters were 1: so is their average.
  chex.assert_trees_all_close(average['weight'].astype(jnp.float32),
                              jnp.ones(4), atol=1e-2)
  chex.assert_trees_all_close(float(state.total_weight),
                              1 - decay**steps, rtol=1e-4)


def test_constant_parameters_average_to_themselves_from_the_first_step():
  """No pull toward the zero start: the debiasing is exact."""
  params = _params()
  zeros = [jax.tree.map(jnp.zeros_like, params)] * 3
  transformation = averaging.parameter_average(0.999)
  state = transformation.init(params)
  for updates in zeros:
    updates_out, state = transformation.update(updates, state, params)
    chex.assert_trees_all_equal(updates_out, updates)
    chex.assert_trees_all_close(averaging.averaged_parameters(state, params),
                                params, rtol=1e-6)


def test_decay_zero_is_the_latest_parameters():
  history, state = _run(averaging.parameter_average(0.0), _params(),
                        _random_updates(3))
  chex.assert_trees_all_close(
      averaging.averaged_parameters(state, history[-1]), history[-1])


def test_updates_pass_unchanged_and_are_found_inside_a_chain():
  params = _params()
  updates = _random_updates(2)
  adam_history, adam_state = _run(optax.adam(1e-2), params, updates)
  chained = optax.chain(optax.adam(1e-2), averaging.parameter_average(0.5))
  chain_history, chain_state = _run(chained, params, updates)
  chex.assert_trees_all_close(chain_history, adam_history)
  # Without an average, and before the first update: the parameters.
  chex.assert_trees_all_equal(
      averaging.averaged_parameters(adam_state, adam_history[-1]),
      adam_history[-1])
  chex.assert_trees_all_equal(
      averaging.averaged_parameters(chained.init(params), params), params)
  average = averaging.averaged_parameters(chain_state, chain_history[-1])
  chex.assert_trees_all_close(  # weights 0.5 / 0.75 and 0.25 / 0.75
      average, jax.tree.map(lambda first, last: (first + 2 * last) / 3,
                            *chain_history), rtol=1e-6)
  chex.assert_tree_all_finite(average)


def test_bad_use_is_an_error():
  with pytest.raises(ValueError, match='decay 1.0'):
    averaging.parameter_average(1.0)
  transformation = averaging.parameter_average(0.9)
  with pytest.raises(ValueError, match='needs the parameters'):
    transformation.update(_params(), transformation.init(_params()))
  config = multidevice_worker.make_config(
      {**SMALL, 'parameter_average_decay': 1.5})
  with pytest.raises(config_checks.ConfigError,
                     match=r'config.parameter_average_decay=1.5: must be in'):
    config_checks.validate_config(config, 1)


def test_training_evaluates_and_checkpoints_the_average(tmp_path):
  """With `parameter_average_decay`, the optimizer still steps the raw
  parameters; `models.variables` (validation, test, export) is the average;
  a checkpoint restores both."""
  decay = 0.5
  config = multidevice_worker.make_config(
      {**SMALL, 'parameter_average_decay': decay})
  plain_config = multidevice_worker.make_config(SMALL)
  state = train.create_train_state(config, (28, 28, 1))
  plain_state = train.create_train_state(plain_config, (28, 28, 1))
  chex.assert_trees_all_equal(models.variables(state)['params'], state.params)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.random((8, 28, 28, 1), np.float32)),
           'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, config=config))
  plain_step = jax.jit(functools.partial(train.train_step,
                                         config=plain_config))
  history = []
  for _ in range(3):
    state, metrics = step(state, batch)
    plain_state, _ = plain_step(plain_state, batch)
    history.append(state.params)
    chex.assert_tree_all_finite(metrics)
  # Adam divides by |gradient|: where one is near 0 the two compilations
  # may differ by a few ulps of it.
  chex.assert_trees_all_close(state.params, plain_state.params, rtol=1e-5,
                              atol=1e-5)
  weights = [0.125, 0.25, 0.5]  # (1 - decay) decay^(3 - t)
  expected = jax.tree.map(
      lambda *leaves: sum(w * leaf for w, leaf in zip(weights, leaves))
      / sum(weights), *history)
  average = models.variables(state)['params']
  chex.assert_trees_all_close(average, expected, rtol=1e-5, atol=1e-7)
  assert not np.allclose(average['conv1']['kernel'],
                         state.params['conv1']['kernel'])

  saved = checkpoints_lib.Checkpoints(tmp_path, keep=2)
  saved.save(3, state, {}, 0.5)
  saved.wait()
  fresh = train.create_train_state(config, (28, 28, 1))
  restored, _ = saved.restore_latest(fresh)
  saved.close()
  chex.assert_trees_all_equal(restored.params, state.params)
  chex.assert_trees_all_equal(models.variables(restored)['params'], average)
