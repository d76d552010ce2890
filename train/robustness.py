"""Robustness to rotations and affine transformations of trained models.

Image transforms (numpy, host side, float32 images `(N, H, W, C)`):

* `affine_warp`: out = in o inverse(p -> M (p - c_in) + c_out + t), with
  bilinear interpolation and zero fill. Points are (row, col), rows pointing
  down; c is the centre ((H - 1) / 2, (W - 1) / 2) of each image.
* `rotate(images, degrees)`: about the centre, counter-clockwise as
  displayed for a positive angle. Rotating by 0 is exactly the identity
  (the source coordinates are then exact integers and bilinear weights
  exactly 1 and 0).
* `affine_test_set`: an affNIST-like test set. Each digit gets, independently
  and uniformly: a rotation in [-20, 20] degrees, a horizontal shear factor
  in [-0.2, 0.2] (col += shear * row), a scale in [0.8, 1.2] along rows and
  another along columns, applied as M = R(rotation) @ Shear @ Scale about the
  digit's centre; then a translation uniform over the positions that keep
  the transformed digit's ink box inside the canvas (40x40 by default, as
  affNIST). affNIST itself (Tieleman) uses transformations of the same kinds
  on a 40x40 canvas; these exact ranges are our choice (`AffineRanges`).

The command

    python -m train.robustness --workdirs=DIR1,DIR2 --out=DIR
        [--angles=-60:60:5] [--num_examples=-1] [--batch_size=250]

restores each workdir's best checkpoint on validation (its config is read
from `config.json` in the workdir) and measures test accuracy on the MNIST
test set rotated by every angle of the sweep (default -60..60 in steps of 5,
including +-35), and on the affine set at the model's input size (28x28
models: affine digits on a 28x28 canvas; 40x40 affNIST-style models: on
40x40). It prints a table, and writes `robustness.json` and
`robustness.png` (accuracy against angle, one line per model) to --out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train import multimnist

DEFAULT_ANGLES = tuple(range(-60, 61, 5))


# ---------------------------------------------------------------------------
# Warps.


def _centre(size: int) -> float:
  return (size - 1) / 2.0


def _inverse_2x2(matrices: np.ndarray) -> np.ndarray:
  """Inverses of (N, 2, 2) matrices, closed form (exact for the identity)."""
  a, b = matrices[:, 0, 0], matrices[:, 0, 1]
  c, d = matrices[:, 1, 0], matrices[:, 1, 1]
  determinant = a * d - b * c
  if np.any(determinant == 0):
    raise ValueError('singular affine matrix')
  return np.stack([np.stack([d, -b], -1), np.stack([-c, a], -1)],
                  1) / determinant[:, None, None]


def bilinear_sample(images: np.ndarray, rows: np.ndarray,
                    cols: np.ndarray) -> np.ndarray:
  """images `(N, H, W, C)` at real points rows/cols `(N, h, w)`, zero outside.

  Returns `(N, h, w, C)` float32.
  """
  num, height, width, channels = images.shape
  row0, col0 = np.floor(rows), np.floor(cols)
  row_weight, col_weight = rows - row0, cols - col0
  row0, col0 = row0.astype(np.int64), col0.astype(np.int64)
  flat = images.reshape(num, height * width, channels)
  index = np.arange(num)[:, None, None]
  result = np.zeros((*rows.shape, channels), np.float64)
  for d_row, weight_r in ((0, 1.0 - row_weight), (1, row_weight)):
    for d_col, weight_c in ((0, 1.0 - col_weight), (1, col_weight)):
      r, c = row0 + d_row, col0 + d_col
      inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
      values = flat[index, np.where(inside, r * width + c, 0)]
      weight = np.where(inside, weight_r * weight_c, 0.0)
      result += weight[..., None] * values
  return result.astype(np.float32)


def affine_warp(images: np.ndarray, matrices: np.ndarray,
                translations: np.ndarray | None = None,
                output_size: int | tuple[int, int] | None = None,
                chunk: int = 1000) -> np.ndarray:
  """Applies p_out = M (p_in - c_in) + c_out + t to each image.

  Args:
    images: `(N, H, W, C)`.
    matrices: `(N, 2, 2)` or `(2, 2)` M, acting on (row, col) points.
    translations: `(N, 2)` or `(2,)` t in output pixels (row, col); 0 if None.
    output_size: the output's (height, width) (an int for a square); the
      input's if None.
    chunk: images per vectorised step (bounds the memory).

  Returns:
    `(N, h, w, C)` float32: out(p) = bilinear(in, M^-1 (p - c_out - t) + c_in),
    zero where the source point is outside the input.
  """
  num, height, width, _ = images.shape
  if output_size is None:
    output_size = (height, width)
  elif isinstance(output_size, int):
    output_size = (output_size, output_size)
  out_h, out_w = output_size
  matrices = np.broadcast_to(np.asarray(matrices, np.float64), (num, 2, 2))
  translations = np.broadcast_to(
      np.zeros(2) if translations is None else
      np.asarray(translations, np.float64), (num, 2))
  inverses = _inverse_2x2(matrices)
  grid_r, grid_c = np.meshgrid(np.arange(out_h, dtype=np.float64),
                               np.arange(out_w, dtype=np.float64),
                               indexing='ij')
  outputs = []
  for start in range(0, num, chunk):
    stop = min(start + chunk, num)
    inv = inverses[start:stop]
    # Position relative to the output centre and the translation.
    rel_r = grid_r[None] - _centre(out_h) - translations[start:stop, 0,
                                                         None, None]
    rel_c = grid_c[None] - _centre(out_w) - translations[start:stop, 1,
                                                         None, None]
    src_r = (inv[:, 0, 0, None, None] * rel_r +
             inv[:, 0, 1, None, None] * rel_c) + _centre(height)
    src_c = (inv[:, 1, 0, None, None] * rel_r +
             inv[:, 1, 1, None, None] * rel_c) + _centre(width)
    outputs.append(bilinear_sample(images[start:stop], src_r, src_c))
  if not outputs:
    return np.zeros((0, out_h, out_w, images.shape[-1]), np.float32)
  return np.concatenate(outputs)


def rotation_matrices(degrees: float | np.ndarray) -> np.ndarray:
  """`(N, 2, 2)` (or `(2, 2)`) counter-clockwise rotations on (row, col)."""
  radians = np.deg2rad(np.asarray(degrees, np.float64))
  cos, sin = np.cos(radians), np.sin(radians)
  # Rows point down: a counter-clockwise turn maps (row, col) to
  # (cos row - sin col, sin row + cos col).
  return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def rotate(images: np.ndarray, degrees: float | np.ndarray) -> np.ndarray:
  """Rotates images about their centre by `degrees` (scalar or `(N,)`),
  counter-clockwise as displayed; bilinear, zero fill, same size."""
  matrices = rotation_matrices(degrees)
  return affine_warp(images, matrices)


# ---------------------------------------------------------------------------
# The affine test set.


@dataclasses.dataclass(frozen=True)
class AffineRanges:
  """Uniform ranges of the affine test set's transformations."""

  max_rotation_degrees: float = 20.0
  max_shear: float = 0.2
  min_scale: float = 0.8
  max_scale: float = 1.2
  translate: bool = True  # anywhere the ink box fits in the canvas


def sample_affine(rng: np.random.Generator, num: int,
                  ranges: AffineRanges = AffineRanges()) -> dict[str, np.ndarray]:
  """Per-example transformation parameters, uniform in `ranges`.

  One row of 6 uniforms per example, so the first n examples of a larger
  set get the same parameters as a set of n.
  """
  uniform = rng.uniform(size=(num, 6))

  def between(low, high, values):
    return low + (high - low) * values

  return {
      'rotation_degrees': between(-ranges.max_rotation_degrees,
                                  ranges.max_rotation_degrees, uniform[:, 0]),
      'shear': between(-ranges.max_shear, ranges.max_shear, uniform[:, 1]),
      'scale': between(ranges.min_scale, ranges.max_scale, uniform[:, 2:4]),
      # Where in the allowed translation range, in [0, 1) per axis.
      'position': uniform[:, 4:6],
  }


def affine_matrices(parameters: dict[str, np.ndarray]) -> np.ndarray:
  """M = R @ Shear @ Scale, `(N, 2, 2)`, on (row, col) points."""
  num = len(parameters['shear'])
  shear = np.tile(np.eye(2), (num, 1, 1))
  shear[:, 1, 0] = parameters['shear']  # col += shear * row
  scale = np.zeros((num, 2, 2))
  scale[:, 0, 0] = parameters['scale'][:, 0]
  scale[:, 1, 1] = parameters['scale'][:, 1]
  return rotation_matrices(parameters['rotation_degrees']) @ shear @ scale


def _ink_box_corners(images: np.ndarray, threshold: float) -> np.ndarray:
  """(N, 4, 2) corners (row, col) of each image's ink box, centred."""
  boxes = multimnist.bounding_boxes(images, threshold).astype(np.float64)
  top, bottom = boxes[:, 0], boxes[:, 1] - 1
  left, right = boxes[:, 2], boxes[:, 3] - 1
  centre_r, centre_c = _centre(images.shape[1]), _centre(images.shape[2])
  corners = np.stack([np.stack([top, left], -1), np.stack([top, right], -1),
                      np.stack([bottom, left], -1),
                      np.stack([bottom, right], -1)], 1)
  return corners - np.array([centre_r, centre_c])


def affine_test_set(images: np.ndarray, labels: np.ndarray, seed: int = 0,
                    canvas_size: int = 40,
                    ranges: AffineRanges = AffineRanges(),
                    threshold: float = 0.0):
  """Each image randomly transformed (see the module docstring) onto a
  `canvas_size` square canvas.

  Returns:
    (images `(N, S, S, C)` float32, labels, parameters) where parameters
    holds the sampled values plus 'matrix' `(N, 2, 2)` and 'translation'
    `(N, 2)`.
  """
  rng = np.random.default_rng([seed, 5])
  parameters = sample_affine(rng, len(labels), ranges)
  matrices = affine_matrices(parameters)
  # Transformed ink box, relative to the canvas centre, before translation;
  # +-1 pixel for the bilinear spread.
  corners = np.einsum('nij,nkj->nki', matrices,
                      _ink_box_corners(images, threshold))
  low = corners.min(axis=1) - 1.0
  high = corners.max(axis=1) + 1.0
  centre = _centre(canvas_size)
  # t keeps centre + low + t >= 0 and centre + high + t <= canvas - 1.
  t_min = -(centre + low)
  t_max = (canvas_size - 1) - (centre + high)
  fits = t_max >= t_min
  translations = np.where(
      fits, t_min + parameters['position'] * (t_max - t_min), 0.0)
  if not ranges.translate:
    translations = np.zeros_like(translations)
  parameters['matrix'] = matrices
  parameters['translation'] = translations
  warped = affine_warp(images, matrices, translations, canvas_size)
  return warped, labels, parameters


def center_on_canvas(images: np.ndarray, canvas_size: int) -> np.ndarray:
  """Pads `(N, h, w, C)` images with zeros to `canvas_size`, centred."""
  return multimnist.to_canvas(images, np.zeros((len(images), 2), np.int64),
                              canvas_size)


# ---------------------------------------------------------------------------
# The command.


def accuracy_sweep(predict, images: np.ndarray, labels: np.ndarray,
                   angles: Sequence[float], affine_images: np.ndarray | None,
                   affine_labels: np.ndarray | None = None
                   ) -> dict[str, Any]:
  """Accuracy of `predict(images) -> (N,) classes` on each rotation and on
  the affine set."""
  result = {'angles': [float(a) for a in angles], 'accuracy': []}
  for angle in angles:
    predictions = predict(rotate(images, angle))
    result['accuracy'].append(float(np.mean(predictions == labels)))
  if affine_images is not None:
    result['affine_accuracy'] = float(
        np.mean(predict(affine_images) == affine_labels))
  return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A console table: one row per angle (and 'affine'), one column a model."""
  names = list(results)
  width = max([12] + [len(name) for name in names])
  lines = ['angle'.rjust(8) + ''.join(name.rjust(width + 2) for name in names)]
  angles = next(iter(results.values()))['angles'] if results else []
  for row, angle in enumerate(angles):
    lines.append(f'{angle:8.0f}' + ''.join(
        f'{results[name]["accuracy"][row]:{width + 2}.2%}' for name in names))
  if any('affine_accuracy' in r for r in results.values()):
    lines.append('affine'.rjust(8) + ''.join(
        (f'{results[name]["affine_accuracy"]:{width + 2}.2%}'
         if 'affine_accuracy' in results[name] else '-'.rjust(width + 2))
        for name in names))
  return '\n'.join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
  """accuracy vs angle, one line per model (affine accuracy in the legend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axis = plt.subplots(figsize=(7, 4.5))
  for name, result in results.items():
    label = name
    if 'affine_accuracy' in result:
      label += f' (affine {result["affine_accuracy"]:.1%})'
    axis.plot(result['angles'], 100 * np.asarray(result['accuracy']),
              marker='o', markersize=3, label=label)
  axis.set_xlabel('rotation of the test set (degrees)')
  axis.set_ylabel('test accuracy (%)')
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def evaluate_workdir(workdir: str | Path, angles: Sequence[float],
                     num_examples: int = -1, batch_size: int = 250,
                     affine_seed: int = 0) -> dict[str, Any]:
  """Restores the best checkpoint of `workdir` and sweeps it."""
  from train import experiments  # pylint: disable=g-import-not-at-top

  restored = experiments.restore_best(workdir)
  config = restored.config
  if config.dataset == 'multimnist':
    raise ValueError(f'{workdir}: a MultiMNIST model classifies pairs; the '
                     'rotation sweep is for single-digit models')
  splits = experiments.load_source_splits(config)
  images, labels = splits.test_images, splits.test_labels
  if num_examples > 0:
    images, labels = images[:num_examples], labels[:num_examples]
  size = restored.image_shape[0]
  affine_images, affine_labels, _ = affine_test_set(
      images, labels, seed=affine_seed, canvas_size=size)
  if size != images.shape[1]:
    images = center_on_canvas(images, size)
  predict = experiments.make_predict(restored, batch_size)
  result = accuracy_sweep(predict, images, labels, angles, affine_images,
                          affine_labels)
  result.update(workdir=str(workdir), checkpoint_step=restored.step,
                model=experiments.model_name(config), dataset=config.dataset,
                input_size=size, test_examples=int(len(labels)))
  return result


def _parse_angles(text: str) -> list[float]:
  """'-60:60:5' (inclusive range) or '0,35,-35'."""
  if ':' in text:
    start, stop, step = (float(part) for part in text.split(':'))
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [start + i * step for i in range(count)]
  return [float(part) for part in text.split(',') if part]


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description='Accuracy of trained models on rotated and affine-'
      'transformed MNIST test digits.')
  parser.add_argument('--workdirs', required=True,
                      help='comma-separated training workdirs')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--angles', default='-60:60:5',
                      help="'start:stop:step' (inclusive) or a list 'a,b,c'")
  parser.add_argument('--num_examples', type=int, default=-1,
                      help='first N test digits (-1: all 10000)')
  parser.add_argument('--batch_size', type=int, default=250)
  parser.add_argument('--affine_seed', type=int, default=0)
  args = parser.parse_args(argv)
  angles = _parse_angles(args.angles)
  out = Path(args.out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for workdir in [w for w in args.workdirs.split(',') if w]:
    name = Path(workdir).expanduser().absolute().name
    while name in results:
      name += "'"
    print(f'evaluating {workdir} ...', flush=True)
    results[name] = evaluate_workdir(Path(workdir).expanduser(), angles,
                                     args.num_examples, args.batch_size,
                                     args.affine_seed)
  print(format_table(results))
  (out / 'robustness.json').write_text(json.dumps(results, indent=2) + '\n')
  plot(results, out / 'robustness.png')
  print(f'wrote {out / "robustness.json"} and {out / "robustness.png"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
