"""A trained model: a finished training run's best checkpoint on
validation, or shipped parameters (`train.pretrained`), restored, and a
predictor over it (for `train.robustness`, `train.figures` and
`train.pretrained`).

A model's *source* is a training workdir, or `pretrained:NAME` for the
parameters shipped as NAME, which outlive any workdir.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from train import batching
from train import checkpoints
from train import input_pipeline
from train import models
from train import train
from train import workdir as workdir_lib


PRETRAINED_PREFIX = 'pretrained:'


@dataclasses.dataclass
class Restored:
  """A trained model.

  Attributes:
    config: the config it was trained with.
    variables: `{'params': ..., and its other collections}`, as
      `model.apply` takes them.
    step: the training step of its parameters.
    image_shape: its input, `(height, width, channels)`.
    state: the whole train state (optimizer included) when restored from a
      workdir; None for shipped parameters.
  """

  config: ml_collections.ConfigDict
  variables: dict[str, Any]
  step: int
  image_shape: tuple[int, ...]
  state: Any = None

  @property
  def model(self):
    return models.create_model(self.config)

  @property
  def params(self):
    return self.variables['params']


def load(source: str | Path, pretrained_dir: Path | None = None) -> Restored:
  """The model of `source`: a workdir's best checkpoint on validation, or
  `pretrained:NAME`'s shipped parameters (in `pretrained_dir`, by default
  the repository's)."""
  if str(source).startswith(PRETRAINED_PREFIX):
    from train import pretrained  # pylint: disable=g-import-not-at-top
    return pretrained.restore(str(source)[len(PRETRAINED_PREFIX):],
                              pretrained_dir or pretrained.DIRECTORY)
  return restore_best(source)


def restore_best(workdir: str | Path) -> Restored:
  """The config and best-on-validation train state of a training workdir."""
  workdir = Path(workdir).expanduser().absolute()
  config = workdir_lib.load_config(workdir)
  shape = input_pipeline.image_shape(config)
  state = jax.jit(lambda: train.create_train_state(config, shape))()
  # Read only: a damaged checkpoint is skipped, never moved.
  saved = checkpoints.Checkpoints(workdir, config.get('keep_checkpoints', 3),
                                  read_only=True)
  try:
    restored = saved.restore_best(state)
  finally:
    saved.close()
  if restored is None:
    raise FileNotFoundError(f'{workdir}: no readable checkpoint')
  state, _ = restored
  return Restored(config, models.variables(state), int(state.step), shape,
                  state)


def make_predict(restored: Restored, batch_size: int = 250,
                 batches_per_call: int = 8):
  """images (N, H, W, C) numpy -> (N,) predicted classes, in batches.

  `batches_per_call` batches go through each compiled call, as in
  `train.evaluate`: what depends only on the parameters is computed once a
  call.
  """
  apply_fn, variables = restored.model.apply, restored.variables

  @jax.jit
  def scores(variables, stacked_images):
    return jax.lax.map(
        lambda images: models.class_scores(apply_fn(variables, images)),
        stacked_images)

  def predict(images: np.ndarray) -> np.ndarray:
    stacks = batching.stacked_batches(
        batching.eval_batches(images, np.zeros(len(images), np.int32),
                              batch_size),
        batching.stack_size(len(images), batch_size, batches_per_call))
    predictions = [np.argmax(np.asarray(scores(variables, stack['image'])),
                             -1).ravel() for stack in stacks]
    return (np.concatenate(predictions)[:len(images)] if predictions else
            np.zeros((0,), np.int64))

  return predict
