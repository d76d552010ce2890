"""Dataset- and model-specific parts of the training loop, behind small
functions that `train.train` calls.

Datasets beyond MNIST / Fashion-MNIST (`config.dataset`):
  'multimnist': pairs of overlapping MNIST digits on a 36x36 canvas
    (`train.multimnist`). Two-label margin loss (multi-hot targets), each
    digit reconstructed from its own capsule (masked by its label, in
    training and evaluation) against that digit alone; accuracy = the two
    longest capsules are the two labels.
  'affnist': MNIST centred on a 40x40 canvas and randomly translated by up
    to `config.max_shift` pixels for training; validation on translated
    validation digits (fixed shifts); test on the affine test set
    (`train.robustness.affine_test_set`).

Models (`config.model.name`): 'capsnet' (default), 'baseline_cnn' and
'lenet5' (`train.baselines`), the baselines trained with softmax cross
entropy (sigmoid cross entropy on the two labels for MultiMNIST).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capsjax import losses
from capsjax import metrics
from train import baselines
from train import input_pipeline
from train import multimnist
from train import robustness

DATASETS = ('multimnist', 'affnist')  # in addition to train.train's
MODELS = ('capsnet', 'baseline_cnn', 'lenet5')
NUM_CLASSES = 10


# ---------------------------------------------------------------------------
# Config.


def model_name(config: ml_collections.ConfigDict) -> str:
  return config.model.get('name', 'capsnet')


def is_baseline(config: ml_collections.ConfigDict) -> bool:
  return model_name(config) != 'capsnet'


def source_dataset(config: ml_collections.ConfigDict) -> str:
  """The dataset whose files are loaded: 'mnist' for MultiMNIST/affNIST."""
  return 'mnist' if config.dataset in DATASETS else config.dataset


def config_problems(config: ml_collections.ConfigDict
                    ) -> list[tuple[str, str]]:
  """(field, message) of each impossible setting of the fields used here."""
  problems = []
  if model_name(config) not in MODELS:
    problems.append(('model.name', f'must be one of {MODELS}'))
  elif is_baseline(config) and config.reconstruction_weight > 0:
    problems.append(('reconstruction_weight',
                     f'must be 0 for model.name={model_name(config)!r} (no '
                     'decoder)'))
  for dataset in DATASETS:
    if config.dataset == dataset and dataset not in config:
      return problems + [('dataset', f'needs the {dataset} settings: use '
                          f'--config=train/configs/{dataset}.py')]
  if config.dataset == 'multimnist':
    if config.max_shift > multimnist.MAX_SHIFT:
      problems.append(('max_shift', 'must be <= 4 for MultiMNIST (the digit '
                       'must stay on the 36x36 canvas)'))
    if config.multimnist.merge not in multimnist.MERGE_MODES:
      problems.append(('multimnist.merge',
                       f'must be one of {multimnist.MERGE_MODES}'))
  if config.dataset == 'affnist':
    room = (config.affnist.canvas_size - 28) // 2
    if room < 0:
      problems.append(('affnist.canvas_size', 'must be >= 28'))
    elif config.max_shift > room:
      problems.append(('max_shift', f'must be <= {room} to keep the digit on '
                       f'the {config.affnist.canvas_size} canvas'))
  return problems


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run was started with (`workdir/config.json`); the default
  config, with a warning, for workdirs from before config.json existed."""
  path = Path(workdir) / 'config.json'
  if path.is_file():
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  from train.configs import default  # pylint: disable=g-import-not-at-top
  print(f'warning: {path} not found; assuming the default config',
        flush=True)
  return default.get_config()


# ---------------------------------------------------------------------------
# Models.


def create_baseline(config: ml_collections.ConfigDict, dtype: Any,
                    conv_method: str):
  """The baseline named by config.model.name, configured from the config;
  its convolutions by `capsjax.convolution.conv2d(method=conv_method)`."""
  name = model_name(config)
  if name == 'baseline_cnn':
    cnn = config.model.get('cnn', ml_collections.ConfigDict())
    return baselines.BaselineCNN(
        num_classes=NUM_CLASSES,
        conv_features=tuple(cnn.get('conv_features', (256, 256, 128))),
        hidden_sizes=tuple(cnn.get('hidden_sizes', (328, 192))),
        dropout_rate=cnn.get('dropout_rate', 0.5),
        pool_after=tuple(cnn.get('pool_after', ())),
        conv_implementation=conv_method, dtype=dtype)
  if name == 'lenet5':
    lenet = config.model.get('lenet', ml_collections.ConfigDict())
    return baselines.LeNet5(num_classes=NUM_CLASSES,
                            activation=lenet.get('activation', 'relu'),
                            pooling=lenet.get('pooling', 'max'),
                            conv_implementation=conv_method, dtype=dtype)
  raise ValueError(f'config.model.name={name!r} is not a baseline')


def apply_model(apply_fn, params, batch: dict[str, jax.Array],
                config: ml_collections.ConfigDict, *, train: bool,
                step: jax.Array | int | None = None):
  """The model's output on a batch.

  CapsNet decodes the labelled capsules in training and, for MultiMNIST,
  also in evaluation (each digit from its own capsule); otherwise (MNIST
  evaluation) the longest capsule. Baselines get dropout in training, its
  rng a pure function of (config.seed, step), so resuming is exact.
  """
  variables = {'params': params}
  if is_baseline(config):
    if not train:
      return apply_fn(variables, batch['image'])
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    return apply_fn(variables, batch['image'], deterministic=False,
                    rngs={'dropout': key})
  if train or config.dataset == 'multimnist':
    return apply_fn(variables, batch['image'], batch['label'])
  return apply_fn(variables, batch['image'])


def class_scores(output) -> jax.Array:
  """`(batch, classes)`: capsule lengths, or a baseline's logits."""
  if isinstance(output, baselines.ClassifierOutput):
    return output.logits
  return output.lengths


def has_own_losses(config: ml_collections.ConfigDict) -> bool:
  """True where `per_example_losses` below replaces the MNIST CapsNet's."""
  return is_baseline(config) or config.dataset == 'multimnist'


def per_example_losses(output, batch: dict[str, jax.Array],
                       config: ml_collections.ConfigDict
                       ) -> dict[str, jax.Array]:
  """Losses and accuracy, each `(batch,)`, for baselines and MultiMNIST."""
  labels = batch['label']
  two_labels = config.dataset == 'multimnist'
  if is_baseline(config):
    logits = output.logits
    if two_labels:
      # Each class present or not: a sigmoid per class.
      cross_entropy = jnp.sum(optax.sigmoid_binary_cross_entropy(
          logits, metrics.multi_hot(labels, NUM_CLASSES)), axis=-1)
      accuracy = metrics.multi_label_accuracy(logits, labels)
    else:
      cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels)
      accuracy = metrics.accuracy(logits, labels)
    return {'loss': cross_entropy, 'cross_entropy': cross_entropy,
            'accuracy': accuracy}
  if not two_labels:
    raise ValueError('the MNIST CapsNet losses are train.per_example_losses')
  margin = losses.margin_loss(
      output.lengths, metrics.multi_hot(labels, NUM_CLASSES),
      margin_positive=config.margin_positive,
      margin_negative=config.margin_negative,
      absent_class_weight=config.absent_class_weight)
  if output.reconstructions is None:
    reconstruction = jnp.zeros_like(margin)
  else:
    # (batch, 2, H, W, 1): digit k reconstructed from capsule labels[:, k].
    reconstruction = sum(
        losses.reconstruction_loss(output.reconstructions[:, k],
                                   batch['digits'][:, k],
                                   weight=config.reconstruction_weight)
        for k in range(labels.shape[1]))
  return {
      'loss': margin + reconstruction,
      'margin_loss': margin,
      'reconstruction_loss': reconstruction,
      'accuracy': metrics.multi_label_accuracy(output.lengths, labels),
      'per_digit_accuracy': metrics.per_label_accuracy(output.lengths,
                                                       labels),
  }


# ---------------------------------------------------------------------------
# Data.


def image_shape(config: ml_collections.ConfigDict,
                train_data: tuple[np.ndarray, np.ndarray]) -> tuple[int, ...]:
  """The model's input shape (the training images' after any canvas)."""
  channels = train_data[0].shape[-1]
  if config.dataset == 'multimnist':
    return (multimnist.CANVAS_SIZE, multimnist.CANVAS_SIZE, channels)
  if config.dataset == 'affnist':
    size = config.affnist.canvas_size
    return (size, size, channels)
  return tuple(train_data[0].shape[1:])


def _limited(count: int, limit: int) -> int:
  return count if limit <= 0 else min(count, limit)


def prepare_data(config: ml_collections.ConfigDict, train_data, validation,
                 test):
  """(train, validation, test) as the training loop uses them.

  MNIST and Fashion-MNIST: unchanged. MultiMNIST: the training digits stay
  as they are (pairs are made on the fly); validation and test become
  (PairSet, labels). affNIST: validation digits on the canvas with fixed
  random shifts, test the affine set; the training digits stay 28x28 (the
  canvas and shift are applied per batch).
  """
  if config.dataset == 'multimnist':
    settings = config.multimnist
    validation_pairs = multimnist.PairSet(
        *validation, seed=settings.eval_seed, merge_mode=settings.merge,
        max_shift=config.max_shift,
        num_pairs=_limited(settings.num_validation_pairs,
                           config.num_eval_examples))
    if settings.test_pairs_per_digit > 0 and config.num_eval_examples <= 0:
      test_pairs = multimnist.PairSet(
          *test, pairs_per_digit=settings.test_pairs_per_digit,
          seed=settings.eval_seed + 1, merge_mode=settings.merge,
          max_shift=config.max_shift)
    else:
      test_pairs = multimnist.PairSet(
          *test, seed=settings.eval_seed + 1, merge_mode=settings.merge,
          max_shift=config.max_shift,
          num_pairs=_limited(settings.num_test_pairs,
                             config.num_eval_examples))
    return (train_data, (validation_pairs, validation_pairs.labels),
            (test_pairs, test_pairs.labels))
  if config.dataset == 'affnist':
    settings = config.affnist
    rng = np.random.default_rng([settings.eval_seed, 6])
    shifts = input_pipeline.sample_shifts(rng, len(validation[1]),
                                          config.max_shift)
    validation = (multimnist.to_canvas(validation[0], shifts,
                                       settings.canvas_size), validation[1])
    test_images, test_labels, _ = robustness.affine_test_set(
        *test, seed=settings.eval_seed, canvas_size=settings.canvas_size,
        ranges=affine_ranges(config))
    return train_data, validation, (test_images, test_labels)
  return train_data, validation, test


def affine_ranges(config: ml_collections.ConfigDict
                  ) -> robustness.AffineRanges:
  settings = config.affnist
  return robustness.AffineRanges(
      max_rotation_degrees=settings.max_rotation_degrees,
      max_shear=settings.max_shear, min_scale=settings.min_scale,
      max_scale=settings.max_scale)


def train_batches(config: ml_collections.ConfigDict,
                  data: tuple[np.ndarray, np.ndarray], batch_size: int,
                  seed: int, start_step: int = 0,
                  num_steps: int | None = None, process_index: int = 0,
                  process_count: int = 1,
                  max_shift: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """`input_pipeline.train_batches`, or its MultiMNIST / affNIST version;
  every batch a pure function of (seed, step)."""
  kwargs = dict(start_step=start_step, num_steps=num_steps,
                process_index=process_index, process_count=process_count,
                max_shift=max_shift)
  if config.dataset == 'multimnist':
    return multimnist.train_batches(data, batch_size, seed,
                                    merge_mode=config.multimnist.merge,
                                    **kwargs)
  if config.dataset == 'affnist':
    return _canvas_batches(data, batch_size, seed,
                           config.affnist.canvas_size, **kwargs)
  return input_pipeline.train_batches(data, batch_size, seed, **kwargs)


def _canvas_batches(data, batch_size: int, seed: int, canvas_size: int,
                    start_step: int, num_steps: int | None,
                    process_index: int, process_count: int, max_shift: int):
  """MNIST batches centred on the canvas, each digit shifted by up to
  max_shift pixels (rng seeded by (seed, 4, step))."""
  host_rows = input_pipeline._host_rows(  # pylint: disable=protected-access
      batch_size, process_index, process_count)
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    batch = input_pipeline.train_batch(data, step, batch_size, seed,
                                       process_index, process_count,
                                       max_shift=0)
    shifts = input_pipeline.sample_shifts(
        np.random.default_rng([seed, 4, step]), batch_size,
        max_shift)[host_rows]
    batch['image'] = multimnist.to_canvas(batch['image'], shifts, canvas_size)
    yield batch
    step += 1


def eval_batches(images, labels: np.ndarray, batch_size: int,
                 process_index: int = 0, process_count: int = 1):
  """`input_pipeline.eval_batches`, or a PairSet's batches (with digits)."""
  if isinstance(images, multimnist.PairSet):
    return images.batches(batch_size, process_index, process_count)
  return input_pipeline.eval_batches(images, labels, batch_size,
                                     process_index, process_count)


# ---------------------------------------------------------------------------
# Restoring trained models (robustness and figures commands).


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  state: Any  # flax TrainState
  step: int
  image_shape: tuple[int, ...]

  @property
  def model(self):
    from train import train  # pylint: disable=g-import-not-at-top
    return train.create_model(self.config)


def load_source_splits(config: ml_collections.ConfigDict):
  """The splits of the files behind config.dataset (MNIST for MultiMNIST)."""
  return input_pipeline.load_splits(
      source_dataset(config), config.data_dir,
      os.path.expanduser(config.tfds_data_dir),
      config.get('validation_size', 5000))


def restore_best(workdir: str | Path) -> Restored:
  """The config and best-on-validation train state of a training workdir."""
  from train import train  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir).expanduser().absolute()
  config = load_config(workdir)
  if config.dataset in DATASETS:
    shape = image_shape(config, (np.zeros((1, 28, 28, 1)), None))
  else:
    shape = (28, 28, 1)
  state = jax.jit(lambda: train.create_train_state(config, shape))()
  # Read only: a damaged checkpoint is skipped, never moved.
  checkpoints = train.Checkpoints(workdir, config.get('keep_checkpoints', 3),
                                  read_only=True)
  try:
    restored = checkpoints.restore_best(state)
  finally:
    checkpoints.close()
  if restored is None:
    raise FileNotFoundError(f'{workdir}: no readable checkpoint')
  state, _ = restored
  return Restored(config, state, int(state.step), shape)


def make_predict(restored: Restored, batch_size: int = 250):
  """images (N, H, W, C) numpy -> (N,) predicted classes, in batches."""
  apply_fn, params = restored.state.apply_fn, restored.state.params

  @jax.jit
  def scores(params, images):
    return class_scores(apply_fn({'params': params}, images))

  def predict(images: np.ndarray) -> np.ndarray:
    predictions = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros(
          (batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
      predictions.append(np.argmax(np.asarray(scores(params, padded)),
                                   -1)[:len(chunk)])
    return (np.concatenate(predictions) if predictions else
            np.zeros((0,), np.int64))

  return predict
