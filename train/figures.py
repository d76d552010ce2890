"""The paper's figures from a trained CapsNet.

* `reconstructions.png`: test digits beside their reconstructions from the
  longest capsule, titled with the predicted and true label (paper, Fig. 3).
* `perturbation_<i>.png`: dimension perturbation (paper, Fig. 4): the 16D
  capsule of the predicted class of test digit i, one dimension at a time
  shifted by -0.25, -0.20, ..., 0.25 and decoded: a 16 x 11 grid, one row
  per dimension, one column per shift (the middle column is unchanged).
* `multimnist.png` (MultiMNIST models): each input above the
  reconstructions of its two longest capsules, one red and one green, with
  predicted (P) and true (L) labels (paper, Fig. 5).

    python -m train.figures --workdir=DIR [--out=DIR] [--num_examples=16]
        [--perturb=0,1,2]

restores the workdir's best checkpoint on validation (config from
`config.json`), draws the first test examples (MultiMNIST: the run's fixed
test pairs) and writes the PNGs to --out (default: the workdir).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import capsjax
from train import input_pipeline
from train import models
from train import reporting
from train import trained

PERTURBATIONS = tuple(np.round(np.arange(-0.25, 0.2501, 0.05), 2))  # 11


# ---------------------------------------------------------------------------
# Pure pieces.


def perturbed_capsules(capsules: jax.Array, class_index: int,
                       deltas: Sequence[float] = PERTURBATIONS) -> jax.Array:
  """`(classes, dim)` capsules -> `(dim, len(deltas), classes, dim)`: copy
  [d, j] has `deltas[j]` added to dimension d of capsule `class_index`."""
  num_classes, dim = capsules.shape
  deltas = jnp.asarray(deltas, capsules.dtype)
  # offsets[d, j, class, e] = deltas[j] where class == class_index, e == d.
  offsets = (jnp.eye(dim, dtype=capsules.dtype)[:, None, None, :]
             * deltas[None, :, None, None]
             * jax.nn.one_hot(class_index, num_classes,
                              dtype=capsules.dtype)[None, None, :, None])
  return capsules[None, None] + offsets


def decoder_module(model: capsjax.CapsNet,
                   image_shape: Sequence[int]) -> capsjax.MaskedDecoder:
  """The decoder of `model` alone, applied with params['decoder']."""
  return capsjax.MaskedDecoder(tuple(image_shape),
                               tuple(model.decoder_hidden_sizes),
                               dtype=model.dtype)


def perturbation_grid(model: capsjax.CapsNet, params, capsules: jax.Array,
                      class_index: int, image_shape: Sequence[int],
                      deltas: Sequence[float] = PERTURBATIONS) -> np.ndarray:
  """Decodes every perturbed copy of one digit's capsules.

  Args:
    model: the CapsNet (for its decoder's sizes); params: its parameters.
    capsules: `(classes, dim)` class capsules of one digit.
    class_index: the capsule to perturb (the predicted class).
    image_shape: `(H, W, C)` of the decoder's output.

  Returns:
    `(dim, len(deltas), H, W, C)` reconstructions.
  """
  perturbed = perturbed_capsules(capsules, class_index, deltas)
  dim, steps = perturbed.shape[:2]
  flat = perturbed.reshape(dim * steps, *capsules.shape)
  labels = jnp.full((dim * steps,), class_index, jnp.int32)
  decoded = jax.jit(decoder_module(model, image_shape).apply)(
      {'params': params['decoder']}, flat, labels)
  return np.asarray(decoded).reshape(dim, steps, *image_shape)


def mosaic(grid: np.ndarray, gap: int = 1) -> np.ndarray:
  """`(rows, cols, H, W[, C])` images -> one `(rows*(H+gap)-gap, ...)` image
  with `gap` white pixels between tiles."""
  rows, cols, height, width = grid.shape[:4]
  grid = grid[..., 0] if grid.ndim == 5 and grid.shape[-1] == 1 else grid
  extra = grid.shape[4:]
  out = np.ones((rows * (height + gap) - gap, cols * (width + gap) - gap,
                 *extra), np.float32)
  for row in range(rows):
    for col in range(cols):
      top, left = row * (height + gap), col * (width + gap)
      out[top:top + height, left:left + width] = grid[row, col]
  return out


def save_perturbation_png(path: Path, grid: np.ndarray,
                          scale: int = 3) -> np.ndarray:
  """Writes the `(dim, steps, H, W, 1)` grid as a PNG, `scale` pixels per
  pixel, exactly `(dim * (H + 1) - 1) * scale` tall; returns the image."""
  image = np.clip(mosaic(grid), 0, 1)
  image = np.kron(image, np.ones((scale, scale), np.float32))
  reporting.pyplot().imsave(path, image, cmap='gray', vmin=0, vmax=1)
  return image


def two_colour(reconstructions: np.ndarray) -> np.ndarray:
  """`(N, 2, H, W, 1)` -> `(N, H, W, 3)` RGB: digit 1 red, digit 2 green."""
  red, green = reconstructions[:, 0, ..., 0], reconstructions[:, 1, ..., 0]
  return np.clip(np.stack([red, green, np.zeros_like(red)], -1), 0, 1)


def save_multimnist_png(path: Path, images: np.ndarray, labels: np.ndarray,
                        predictions: np.ndarray,
                        reconstructions: np.ndarray) -> None:
  """Inputs (top) above the two reconstructions in red and green (bottom).

  labels, predictions: `(N, 2)`; reconstructions `(N, 2, H, W, 1)`, decoded
  from the capsules of `predictions`.
  """
  plt = reporting.pyplot()
  count = len(images)
  figure, axes = plt.subplots(2, count, figsize=(1.3 * count, 3.0),
                              squeeze=False)
  colours = two_colour(reconstructions)
  for index in range(count):
    axes[0, index].imshow(images[index, ..., 0], cmap='gray', vmin=0, vmax=1)
    axes[0, index].set_title(
        f'L:({labels[index][0]},{labels[index][1]})', fontsize=7)
    axes[1, index].imshow(colours[index])
    right = set(map(int, predictions[index])) == set(map(int, labels[index]))
    axes[1, index].set_title(
        f'P:({predictions[index][0]},{predictions[index][1]})', fontsize=7,
        color='black' if right else 'red')
  for axis in axes.ravel():
    axis.set_axis_off()
  figure.suptitle('MultiMNIST input (top); reconstructions from the two '
                  'longest capsules, red and green (bottom)', fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


# ---------------------------------------------------------------------------
# From a model.


def draw_all(model: capsjax.CapsNet, params, images: np.ndarray,
             labels: np.ndarray, out: Path, perturb: Sequence[int] = (0,),
             apply=None) -> list[Path]:
  """Every figure of a (trained) CapsNet on these test examples.

  images `(N, H, W, 1)`; labels `(N,)`, or `(N, 2)` for MultiMNIST pairs.
  `apply`: a `jax.jit(model.apply)` to reuse (compiling one costs seconds).
  Returns the paths written.
  """
  if not model.use_decoder:
    raise ValueError('the model has no decoder (trained with '
                     'reconstruction_weight=0): nothing to reconstruct')
  out.mkdir(parents=True, exist_ok=True)
  image_shape = images.shape[1:]
  apply = apply or jax.jit(model.apply)
  output = apply({'params': params}, images)
  lengths = np.asarray(output.lengths)
  written = []
  if labels.ndim == 2:
    top2 = np.asarray(capsjax.metrics.top_k_classes(jnp.asarray(lengths), 2))
    reconstructions = np.asarray(apply(
        {'params': params}, images, jnp.asarray(top2)).reconstructions)
    save_multimnist_png(out / 'multimnist.png', images, labels, top2,
                        reconstructions)
    written.append(out / 'multimnist.png')
  else:
    reporting.save_reconstructions_png(out / 'reconstructions.png', images,
                                       labels,
                             lengths.argmax(-1),
                             np.asarray(output.reconstructions))
    written.append(out / 'reconstructions.png')
  for index in perturb:
    if index >= len(images):
      continue
    predicted = int(lengths[index].argmax())
    grid = perturbation_grid(model, params, output.capsules[index], predicted,
                             image_shape)
    path = out / f'perturbation_{index}.png'
    save_perturbation_png(path, grid)
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      description='Reconstruction, dimension-perturbation and MultiMNIST '
      "figures from a workdir's best checkpoint.")
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default=None,
                      help='output folder (default: the workdir)')
  parser.add_argument('--num_examples', type=int, default=16)
  parser.add_argument('--perturb', default='0,1,2',
                      help='indices of the test examples to perturb')
  args = parser.parse_args(argv)
  workdir = Path(args.workdir).expanduser()
  restored = trained.restore_best(workdir)
  config = restored.config
  if not models.MODELS[models.model_name(config)].has_decoder:
    print(f'error: {workdir} holds a {models.model_name(config)}: no '
          'capsules to draw', file=sys.stderr)
    return 2
  # The run's own test set (all of it: MultiMNIST pairs draw partners from
  # every test digit), of which the first examples are drawn.
  config.num_eval_examples = -1
  splits = input_pipeline.load_source_splits(config)
  _, _, test = input_pipeline.training_data(config, splits)
  examples = test.first(args.num_examples)
  written = draw_all(restored.model, restored.params,
                     np.asarray(examples['image']),
                     np.asarray(examples['label']),
                     Path(args.out).expanduser() if args.out else workdir,
                     [int(i) for i in args.perturb.split(',') if i])
  for path in written:
    print(f'wrote {path}')
  return 0

if __name__ == '__main__':
  sys.exit(main())
