"""Checks of a training config, before anything is compiled or written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

import capsjax
from train import input_pipeline
from train import models


class ConfigError(ValueError):
  """An impossible or unknown setting; the message names the field."""


def config_value(config: ml_collections.ConfigDict, dotted_field: str) -> Any:
  value = config
  for part in dotted_field.split('.'):
    value = value[part]
  return value


def distributed_mode(config: ml_collections.ConfigDict) -> bool | str:
  """config.distributed as True, False or 'auto'.

  The field is a string (its default is 'auto'), so the command line gives
  'True' or 'False'; any case is accepted.
  """
  value = config.distributed
  if isinstance(value, str):
    value = {'true': True, 'false': False, 'auto': 'auto'}.get(value.lower())
  if value not in (True, False, 'auto'):
    raise ConfigError(f'config.distributed={config.distributed!r}: must be '
                      "True, False or 'auto'")
  return value


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int = 1) -> None:
  """Raises ConfigError naming the first impossible field."""

  def require(condition: bool, field: str, message: str) -> None:
    if not condition:
      raise ConfigError(
          f'config.{field}={config_value(config, field)!r}: {message}')

  for field, message in (models.config_problems(config) +
                         input_pipeline.config_problems(config)):
    require(False, field, message)
  require(not config.data_dir or Path(config.data_dir).expanduser().is_dir(),
          'data_dir', 'no such directory')
  require(config.model.routing_iterations >= 1, 'model.routing_iterations',
          'must be >= 1')
  require(config.precision in models.PRECISIONS, 'precision',
          f'must be one of {tuple(models.PRECISIONS)}')
  require(models.conv_method(config) in capsjax.convolution.METHODS,
          'model.conv_method',
          f'must be one of {capsjax.convolution.METHODS}')
  for field in ('batch_size', 'eval_batch_size'):
    require(config[field] >= 1, field, 'must be >= 1')
    require(config[field] % num_devices == 0, field,
            f'must divide evenly over the {num_devices} devices')
    require(config[field] % num_processes == 0, field,
            f'must divide evenly over the {num_processes} processes')
  require(config.eval_batches_per_call >= 1, 'eval_batches_per_call',
          'must be >= 1')
  require(config.num_epochs >= 1 or config.max_steps >= 1, 'num_epochs',
          'must be >= 1 (or set max_steps)')
  target = config.get('stop_at_validation_accuracy', 0.0)
  require(isinstance(target, (int, float)) and 0 <= target < 1,
          'stop_at_validation_accuracy',
          'must be in [0, 1) (a fraction; 0: no target)')
  for field in ('learning_rate', 'learning_rate_decay_rate',
                'reconstruction_weight', 'margin_positive', 'margin_negative',
                'absent_class_weight', 'model.primary_capsule_scale',
                'max_shift'):
    value = config_value(config, field)
    require(isinstance(value, (int, float)) and math.isfinite(value), field,
            'must be a finite number')
  require(config.learning_rate > 0, 'learning_rate', 'must be > 0')
  require(0 < config.learning_rate_decay_rate <= 1, 'learning_rate_decay_rate',
          'must be in (0, 1]')
  require(config.learning_rate_decay_steps >= 1, 'learning_rate_decay_steps',
          'must be >= 1')
  require(config.reconstruction_weight >= 0, 'reconstruction_weight',
          'must be >= 0')
  decay = config.get('parameter_average_decay', 0.0)
  require(isinstance(decay, (int, float)) and 0 <= decay < 1,
          'parameter_average_decay', 'must be in [0, 1) (0: no average)')
  require(config.max_shift >= 0, 'max_shift', 'must be >= 0')
  require(config.checkpoint_every_steps >= 1, 'checkpoint_every_steps',
          'must be >= 1')
  require(config.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1')
  require(config.log_every_steps >= 1, 'log_every_steps', 'must be >= 1')
  require(config.seed >= 0, 'seed', 'must be >= 0')
  distributed_mode(config)
  num_train = input_pipeline.num_train_examples(config)
  require(config.batch_size <= num_train, 'batch_size',
          f'is larger than the {num_train} training examples')
