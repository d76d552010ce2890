"""A finished training run: its best checkpoint on validation, restored, and
a predictor over it (for `train.robustness`, `train.figures` and
`train.pretrained`)."""

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


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  state: Any  # flax TrainState
  step: int
  image_shape: tuple[int, ...]

  @property
  def model(self):
    return models.create_model(self.config)


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
  return Restored(config, state, int(state.step), shape)


def make_predict(restored: Restored, batch_size: int = 250):
  """images (N, H, W, C) numpy -> (N,) predicted classes, in batches."""
  apply_fn, variables = restored.state.apply_fn, models.variables(
      restored.state)

  @jax.jit
  def scores(variables, images):
    return models.class_scores(apply_fn(variables, images))

  def predict(images: np.ndarray) -> np.ndarray:
    predictions = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      padded = batching.pad_batch({'image': chunk}, batch_size)['image']
      predictions.append(np.argmax(np.asarray(scores(variables, padded)),
                                   -1)[:len(chunk)])
    return (np.concatenate(predictions) if predictions else
            np.zeros((0,), np.int64))

  return predict
