"""The models of the training program, in one table.

`MODELS` maps `config.model.name` to a constructor from the config:
'capsnet' (`capsjax.CapsNet`, the default), and the paper's comparisons of
`train/baselines.py`, 'baseline_cnn' and 'lenet5' (no decoder; trained with
cross entropy, see `train/objectives.py`). Adding a model is adding a row.
Every model is called as `model(images, labels=None)`; models with dropout
also take `deterministic=False` and a 'dropout' rng in training.
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
  )


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
  """A row of `MODELS`: its constructor, and whether it has a decoder (and
  so trains with a reconstruction loss) and dropout."""

  create: Callable[[ml_collections.ConfigDict], nn.Module]
  has_decoder: bool
  has_dropout: bool


MODELS = {
    'capsnet': Model(_capsnet, has_decoder=True, has_dropout=False),
    'baseline_cnn': Model(_baseline_cnn, has_decoder=False, has_dropout=True),
    'lenet5': Model(_lenet5, has_decoder=False, has_dropout=False),
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
  return []


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The model named by config.model.name, configured from the config."""
  return MODELS[model_name(config)].create(config)


def apply_model(apply_fn, params, batch: dict[str, jax.Array],
                config: ml_collections.ConfigDict, *, train: bool,
                step: jax.Array | int | None = None):
  """The model's output on a batch.

  The decoder reconstructs from the labelled capsules in training and for
  two-label examples (MultiMNIST: each digit from its own capsule), else
  from the longest capsule. Dropout's rng is a pure function of
  (config.seed, step), so resuming is exact.
  """
  variables = {'params': params}
  labels = batch['label'] if train or batch['label'].ndim == 2 else None
  if train and MODELS[model_name(config)].has_dropout:
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    return apply_fn(variables, batch['image'], labels, deterministic=False,
                    rngs={'dropout': key})
  return apply_fn(variables, batch['image'], labels)


def class_scores(output: Any) -> jax.Array:
  """`(batch, classes)`: capsule lengths, or a classifier's logits."""
  if isinstance(output, baselines.ClassifierOutput):
    return output.logits
  return output.lengths
