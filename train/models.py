"""The models of the training program, in one table.

`MODELS` maps `config.model.name` to a constructor from the config:
'capsnet' (`capsjax.CapsNet`, the default), and the paper's comparisons of
`train/baselines.py`, 'baseline_cnn' and 'lenet5' (no decoder; trained with
cross entropy, see `train/objectives.py`), and 'efficient_capsnet'
(`capsjax.EfficientCapsNet`: self-attention routing, batch norm). Adding a
model is adding a row. Every model is called as `model(images,
labels=None)`; models with dropout also take `deterministic=False` and a
'dropout' rng in training, models with batch norm `train=True` and their
mutable 'batch_stats'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import capsjax
from train import averaging
from train import baselines
from train import datasets

PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_name(config: ml_collections.ConfigDict) -> str:
  # config.json of workdirs from before the field: CapsNet.
  return config.model.get('name', 'capsnet')


def conv_method(config: ml_collections.ConfigDict) -> str:
  # config.json of workdirs from before the field: the default.
  return config.model.get('conv_method', 'auto')


def routing(config: ml_collections.ConfigDict) -> str:
  # config.json of workdirs from before the field: dynamic routing.
  return config.model.get('routing', 'dynamic')


def official_layers(config: ml_collections.ConfigDict | dict[str, Any]
                    ) -> bool:
  # A ConfigDict or a saved config.json (before the field: flax's
  # initialisers).
  return config['model'].get('official_layers', False)


def _capsnet(config: ml_collections.ConfigDict) -> nn.Module:
  model_config = config.model
  return capsjax.CapsNet(
      num_classes=datasets.NUM_CLASSES,
      routing_iterations=model_config.routing_iterations,
      use_decoder=config.reconstruction_weight > 0,
      conv_features=model_config.conv_features,
      primary_capsule_types=model_config.primary_capsule_types,
      primary_capsule_dim=model_config.primary_capsule_dim,
      primary_capsule_scale=model_config.primary_capsule_scale,
      class_capsule_dim=model_config.class_capsule_dim,
      decoder_hidden_sizes=tuple(model_config.decoder_hidden_sizes),
      stop_gradient_intermediate=model_config.stop_gradient_intermediate,
      dtype=PRECISIONS[config.precision],
      conv_method=conv_method(config),
      routing=routing(config),
      official_layers=official_layers(config),
  )


def _efficient_capsnet(config: ml_collections.ConfigDict) -> nn.Module:
  return capsjax.EfficientCapsNet(
      num_classes=datasets.NUM_CLASSES,
      use_decoder=config.reconstruction_weight > 0,
      decoder_hidden_sizes=tuple(config.model.decoder_hidden_sizes),
      dtype=PRECISIONS[config.precision],
      conv_method=conv_method(config))


def _baseline_cnn(config: ml_collections.ConfigDict) -> nn.Module:
  cnn = config.model.get('cnn', ml_collections.ConfigDict())
  return baselines.BaselineCNN(
      num_classes=datasets.NUM_CLASSES,
      conv_features=tuple(cnn.get('conv_features', (256, 256, 128))),
      hidden_sizes=tuple(cnn.get('hidden_sizes', (328, 192))),
      dropout_rate=cnn.get('dropout_rate', 0.5),
      pool_after=tuple(cnn.get('pool_after', ())),
      conv_implementation=conv_method(config),
      dtype=PRECISIONS[config.precision])


def _lenet5(config: ml_collections.ConfigDict) -> nn.Module:
  lenet = config.model.get('lenet', ml_collections.ConfigDict())
  return baselines.LeNet5(
      num_classes=datasets.NUM_CLASSES,
      activation=lenet.get('activation', 'relu'),
      pooling=lenet.get('pooling', 'max'),
      conv_implementation=conv_method(config),
      dtype=PRECISIONS[config.precision])


@dataclasses.dataclass(frozen=True)
class Model:
  """A row of `MODELS`: its constructor, whether it has a decoder (and so
  trains with a reconstruction loss) and dropout, the routing it is built
  with (None: `config.model.routing`), and its variable collections other
  than 'params' (updated by the step, not by the optimizer)."""

  create: Callable[[ml_collections.ConfigDict], nn.Module]
  has_decoder: bool
  has_dropout: bool
  routing: str | None = None
  state_collections: tuple[str, ...] = ()


MODELS = {
    'capsnet': Model(_capsnet, has_decoder=True, has_dropout=False),
    'baseline_cnn': Model(_baseline_cnn, has_decoder=False, has_dropout=True),
    'lenet5': Model(_lenet5, has_decoder=False, has_dropout=False),
    'efficient_capsnet': Model(
        _efficient_capsnet, has_decoder=True, has_dropout=False,
        routing='self_attention', state_collections=('batch_stats',)),
}


def config_problems(config: ml_collections.ConfigDict
                    ) -> list[tuple[str, str]]:
  """(field, message) of each impossible setting of the model."""
  name = model_name(config)
  if name not in MODELS:
    return [('model.name', f'must be one of {tuple(MODELS)}')]
  if not MODELS[name].has_decoder and config.reconstruction_weight > 0:
    return [('reconstruction_weight',
             f'must be 0 for model.name={name!r} (no decoder)')]
  if routing(config) not in capsjax.routing.ALGORITHMS:
    return [('model.routing',
             f'must be one of {capsjax.routing.ALGORITHMS}')]
  fixed_routing = MODELS[name].routing
  if fixed_routing is not None and routing(config) != fixed_routing:
    return [('model.routing',
             f'must be {fixed_routing!r} for model.name={name!r} (the '
             'network is built around it)')]
  if official_layers(config) not in (True, False):
    return [('model.official_layers', 'must be True or False')]
  if official_layers(config) and (name != 'capsnet'
                                  or routing(config) != 'dynamic'):
    return [('model.official_layers',
             "is the official code's CapsNet: needs model.name='capsnet' "
             "and model.routing='dynamic'")]
  return []


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The model named by config.model.name, configured from the config."""
  return MODELS[model_name(config)].create(config)


def state_collections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The model's variable collections besides 'params' (e.g. batch norm's
  'batch_stats'); a train state carries them as `model_state`."""
  return MODELS[model_name(config)].state_collections


def variables(state, params: Any = None) -> dict[str, Any]:
  """{'params': ..., and the model state's collections} of a train state.

  `params` given (the training step's, being differentiated): those. Else
  the parameters as evaluated, tested and exported: their moving average
  where the optimizer keeps one (`config.parameter_average_decay`), else
  the state's parameters.
  """
  if params is None:
    params = averaging.averaged_parameters(state.opt_state, state.params)
  return {'params': params, **getattr(state, 'model_state', {})}


def apply_model(apply_fn, variables: dict[str, Any],
                batch: dict[str, jax.Array],
                config: ml_collections.ConfigDict, *, train: bool,
                step: jax.Array | int | None = None):
  """(the model's output on a batch, its updated non-param collections).

  The decoder reconstructs from the labelled capsules in training and for
  two-label examples (MultiMNIST: each digit from its own capsule), else
  from the longest capsule. Dropout's rng is a pure function of
  (config.seed, step), so resuming is exact. Batch norm normalises with the
  batch's statistics in training (the global batch: under `jit` the mean
  spans every device) and updates its moving averages; in evaluation it
  reads them. The second value is {} for models without such collections,
  and in evaluation.
  """
  model = MODELS[model_name(config)]
  labels = batch['label'] if train or batch['label'].ndim == 2 else None
  if train and model.has_dropout:
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    return apply_fn(variables, batch['image'], labels, deterministic=False,
                    rngs={'dropout': key}), {}
  if train and model.state_collections:
    return apply_fn(variables, batch['image'], labels, train=True,
                    mutable=list(model.state_collections))
  return apply_fn(variables, batch['image'], labels), {}


def class_scores(output: Any) -> jax.Array:
  """`(batch, classes)`: capsule lengths, or a classifier's logits."""
  if isinstance(output, baselines.ClassifierOutput):
    return output.logits
  return output.lengths
