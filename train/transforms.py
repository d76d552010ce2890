"""Image transforms on the host (numpy, float32 images `(N, H, W, C)`).

* `to_canvas`: each image centred on a larger zero canvas, then shifted.
* `bounding_boxes`: the box around each image's ink.
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
"""

from __future__ import annotations

import dataclasses

import numpy as np

from train import batching


# ---------------------------------------------------------------------------
# Canvases and ink boxes.


def to_canvas(images: np.ndarray, shifts: np.ndarray,
              canvas_size: int) -> np.ndarray:
  """Centres each image on a zero canvas, then shifts it by shifts[i].

  Args:
    images: `(N, h, w, c)` with h, w <= canvas_size.
    shifts: `(N, 2)` integer (dy, dx); positive moves down / right.
    canvas_size: side of the square canvas.

  Returns:
    `(N, canvas_size, canvas_size, c)`. A shift up to (canvas_size - h) / 2
    keeps the whole image on the canvas.
  """
  height, width = images.shape[1:3]
  if height > canvas_size or width > canvas_size:
    raise ValueError(f'{height}x{width} images do not fit a {canvas_size} '
                     'canvas')
  top, left = (canvas_size - height) // 2, (canvas_size - width) // 2
  padded = np.pad(images, [(0, 0), (top, canvas_size - height - top),
                           (left, canvas_size - width - left)] +
                  [(0, 0)] * (images.ndim - 3))
  return batching.shift_images(padded, np.asarray(shifts))


def center_on_canvas(images: np.ndarray, canvas_size: int) -> np.ndarray:
  """Pads `(N, h, w, C)` images with zeros to `canvas_size`, centred."""
  return to_canvas(images, np.zeros((len(images), 2), np.int64),
                              canvas_size)


def bounding_boxes(images: np.ndarray, threshold: float = 0.0) -> np.ndarray:
  """(N, 4) int boxes (top, bottom, left, right), bottom/right exclusive, of
  the pixels above `threshold` in each `(N, H, W[, 1])` image; an empty
  image gets (0, 0, 0, 0)."""
  ink = images.reshape(images.shape[0], images.shape[1],
                       images.shape[2], -1).max(-1) > threshold
  rows, cols = ink.any(axis=2), ink.any(axis=1)

  def extent(mask):
    present = mask.any(axis=1)
    low = np.argmax(mask, axis=1)
    high = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(present, low, 0), np.where(present, high, 0)

  top, bottom = extent(rows)
  left, right = extent(cols)
  return np.stack([top, bottom, left, right], axis=1)


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
  boxes = bounding_boxes(images, threshold).astype(np.float64)
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
