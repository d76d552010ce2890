"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018).

Each capsule has a pose M, a 4x4 matrix, and an activation a in (0, 1). A
capsule i votes for the pose of a parent j through a learned transformation
W_ij, V_ij = M_i W_ij, and EM routing (`capsjax.routing.em_routing`) turns
the votes and the children's activations into the parents' poses and
activations.

Pure functions hold the maths:

- `matrix_votes`: V_ij = M_i W_ij;
- `capsule_patches`: the K x K patches of a capsule map, the inputs of a
  convolutional capsule layer;
- `receptive_field_centres` and `coordinate_addition`: the class layer's
  coordinate addition;

and thin linen modules wrap them: `PrimaryMatrixCapsules`,
`ConvMatrixCapsules`, `ClassMatrixCapsules` and the smallNORB network
`MatrixCapsNet`.

A capsule map is a pose array `(batch, height, width, types, 4, 4)` and an
activation array `(batch, height, width, types)`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capsjax import convolution
from capsjax import routing
from capsjax.layers import Conv2D

Dtype = Any
Initializer = Callable[..., jax.Array]

# The side of a pose matrix.
POSE_SIZE = 4

# Each vote component is a sum of POSE_SIZE products M_ik W_kj: LeCun's
# normal for a fan-in of 4 (stddev 1 / sqrt(4)) keeps the votes on the scale
# of the poses.
DEFAULT_WEIGHT_INIT = nn.initializers.normal(stddev=0.5)


class CapsuleMap(NamedTuple):
  """A map of matrix capsules; a pytree.

  poses: `(batch, height, width, types, 4, 4)`.
  activations: `(batch, height, width, types)`, in (0, 1).
  coupling: the assignment R of the routing that produced the map, `(batch,
    height, width, kernel_size**2 * in_types, types)`, summing to one over
    the last axis; None for primary capsules or unless asked for.
  """

  poses: jax.Array
  activations: jax.Array
  coupling: jax.Array | None = None


# ---------------------------------------------------------------------------
# Pure functions.


def matrix_votes(poses: jax.Array, weights: jax.Array) -> jax.Array:
  """Votes of matrix capsules, V_ij = M_i W_ij (a matrix product).

  Every pair of an input capsule i and an output capsule j has its own
  transformation matrix W_ij; a layer that shares W across positions passes
  the same `weights` for every position (it broadcasts over `...`).

  >>> import jax.numpy as jnp
  >>> poses = jnp.broadcast_to(jnp.eye(4), (2, 3, 4, 4))
  >>> weights = jnp.arange(3 * 5 * 16.0).reshape(3, 5, 4, 4)
  >>> votes = matrix_votes(poses, weights)
  >>> votes.shape
  (2, 3, 5, 4, 4)
  >>> bool(jnp.all(votes[1] == weights))  # M_i = I: V_ij = W_ij
  True

  Args:
    poses: M, `(..., in_capsules, P, P)` (P = 4 in the paper).
    weights: W, `(in_capsules, out_capsules, P, P)`.

  Returns:
    V, `(..., in_capsules, out_capsules, P, P)`, in the promoted dtype.
  """
  if poses.ndim < 3 or weights.ndim != 4:
    raise ValueError(
        'matrix_votes expects poses (..., in_capsules, P, P) and weights '
        f'(in_capsules, out_capsules, P, P); got shapes {poses.shape} and '
        f'{weights.shape}')
  if poses.shape[-3] != weights.shape[0] or poses.shape[-1] != weights.shape[2]:
    raise ValueError(
        f'poses {poses.shape} do not match weights {weights.shape}: need '
        'poses.shape[-3] == weights.shape[0] and poses.shape[-1] == '
        'weights.shape[2]')
  return jnp.einsum('...iab,ijbc->...ijac', poses, weights)


def capsule_patches(
    poses: jax.Array, activations: jax.Array, kernel_size: int, stride: int
) -> tuple[jax.Array, jax.Array]:
  """The VALID `kernel_size x kernel_size` patches of a capsule map.

  The input capsules of one position (y, x) of a convolutional capsule
  layer: every type of every position (s y + r, s x + c) of the input map,
  r, c in [0, kernel_size).

  >>> import jax.numpy as jnp
  >>> poses = jnp.zeros((2, 14, 14, 8, 4, 4))
  >>> patch_poses, patch_activations = capsule_patches(
  ...     poses, jnp.zeros((2, 14, 14, 8)), kernel_size=3, stride=2)
  >>> patch_poses.shape, patch_activations.shape
  ((2, 6, 6, 72, 4, 4), (2, 6, 6, 72))

  Args:
    poses: `(batch, height, width, types, P, P)`.
    activations: `(batch, height, width, types)`.
    kernel_size: K, the side of the square window.
    stride: S, the step between windows in both directions.

  Returns:
    The patch poses `(batch, out_height, out_width, K * K * types, P, P)`
    and activations `(batch, out_height, out_width, K * K * types)`, with
    out_height = (height - K) // S + 1 (likewise the width) and the input
    capsules ordered (kernel_row, kernel_col, type).
  """
  if poses.ndim != 6 or activations.shape != poses.shape[:4]:
    raise ValueError(
        'capsule_patches expects poses (batch, height, width, types, P, P) '
        'and activations (batch, height, width, types); got shapes '
        f'{poses.shape} and {activations.shape}')
  batch, _, _, types, *pose = poses.shape
  # Each capsule's pose and activation as channels of one image, so both
  # come out of the same strided slices.
  channels = jnp.concatenate(
      [poses.reshape(*poses.shape[:3], -1),
       activations.astype(poses.dtype)], axis=-1)
  patches = convolution.extract_patches(channels, kernel_size, stride)
  out_height, out_width = patches.shape[1:3]
  patches = patches.reshape(batch, out_height, out_width,
                            kernel_size * kernel_size, channels.shape[-1])
  pose_channels = types * pose[0] * pose[1]
  patch_poses = patches[..., :pose_channels].reshape(
      batch, out_height, out_width, -1, *pose)
  patch_activations = patches[..., pose_channels:].reshape(
      batch, out_height, out_width, -1).astype(activations.dtype)
  return patch_poses, patch_activations


def receptive_field_centres(
    input_size: int, layers: Sequence[tuple[int, int]]
) -> np.ndarray:
  """Centres of the receptive fields of a stack of VALID layers, scaled to
  [0, 1] by the input size.

  Positions are continuous, pixel k spanning [k, k + 1). Output cell p of a
  VALID layer with kernel K and stride S sees the input cells [S p, S p + K),
  whose centre is S p + K / 2; a continuous position c of the output maps
  to S c + (K - S) / 2 of the input. Composing these maps from the last
  layer back to the first gives each final cell's centre in input pixels,
  divided by `input_size`.

  >>> receptive_field_centres(32, [(5, 2), (1, 1), (3, 2), (3, 1)]).tolist()
  [0.265625, 0.390625, 0.515625, 0.640625]

  Args:
    input_size: the input's side, in pixels.
    layers: `(kernel_size, stride)` of each layer, input first.

  Returns:
    `(output_size,)` float64, the centre of each row (or column) of the last
    layer's map, in (0, 1).
  """
  size = input_size
  for kernel_size, stride in layers:
    size = convolution.output_size(size, kernel_size, stride)
  if size < 1:
    raise ValueError(f'layers {layers} do not fit in an input of side '
                     f'{input_size}')
  centres = np.arange(size) + 0.5
  for kernel_size, stride in reversed(layers):
    centres = stride * centres + (kernel_size - stride) / 2
  return centres / input_size


def coordinate_addition(
    votes: jax.Array,
    row_coordinates: jax.Array | np.ndarray | None = None,
    column_coordinates: jax.Array | np.ndarray | None = None,
) -> jax.Array:
  """Adds each capsule's position to its votes (the paper's coordinate
  addition).

  The class layer shares W across positions, so a vote alone does not say
  where its capsule is; the paper adds "the scaled coordinate (row, column)
  of the centre of the receptive field of each capsule to the first two
  elements of the right-hand column of its vote matrix":

      V[b, y, x, ..., 0, P-1] += row_coordinates[y]
      V[b, y, x, ..., 1, P-1] += column_coordinates[x]

  and nothing else changes. The paper does not say how the coordinates are
  scaled; here they are fractions of the input, in [0, 1]: by default the
  centre of each cell of the capsule map, (y + 0.5) / height and (x + 0.5)
  / width; `MatrixCapsNet` passes the centres of the receptive fields in
  the input image (`receptive_field_centres`).

  >>> import jax.numpy as jnp
  >>> votes = coordinate_addition(jnp.zeros((1, 2, 2, 1, 4, 4)))
  >>> votes[0, 1, 0, 0, :, 3].tolist()  # row 1 of 2, column 0 of 2
  [0.75, 0.25, 0.0, 0.0]

  Args:
    votes: `(batch, height, width, ..., P, P)`, e.g. `(batch, height,
      width, in_types, classes, 4, 4)`, with P >= 2.
    row_coordinates: `(height,)`; None: (y + 0.5) / height.
    column_coordinates: `(width,)`; None: (x + 0.5) / width.

  Returns:
    The votes with the coordinates added, same shape; the dtype promoted
    with the coordinates'.
  """
  if votes.ndim < 5 or votes.shape[-1] != votes.shape[-2] or votes.shape[-1] < 2:
    raise ValueError(
        'votes must be (batch, height, width, ..., P, P) with P >= 2, got '
        f'shape {votes.shape}')
  _, height, width, *between, pose_size, _ = votes.shape
  if row_coordinates is None:
    row_coordinates = (np.arange(height) + 0.5) / height
  if column_coordinates is None:
    column_coordinates = (np.arange(width) + 0.5) / width
  row_coordinates = jnp.asarray(row_coordinates, votes.dtype)
  column_coordinates = jnp.asarray(column_coordinates, votes.dtype)
  if row_coordinates.shape != (height,) or column_coordinates.shape != (width,):
    raise ValueError(
        f'coordinates {row_coordinates.shape} and {column_coordinates.shape} '
        f'must be (height,) = ({height},) and (width,) = ({width},)')
  offsets = jnp.zeros((height, width, pose_size, pose_size), votes.dtype)
  offsets = offsets.at[:, :, 0, -1].set(row_coordinates[:, None])
  offsets = offsets.at[:, :, 1, -1].set(column_coordinates[None, :])
  return votes + offsets.reshape(height, width, *([1] * len(between)),
                                 pose_size, pose_size)


# ---------------------------------------------------------------------------
# Linen modules.


class PrimaryMatrixCapsules(nn.Module):
  """Primary capsules: a 1x1 convolution to B types of 4x4 pose and a
  logistic activation each.

  A 1x1 convolution is a dense layer on the channel axis: 'pose' `(A, 16 B)`
  and 'activation' `(A, B)`, each with a bias: 17 B (A + 1) parameters.
  """

  capsule_types: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> CapsuleMap:
    """`(batch, height, width, A)` -> a `CapsuleMap` of B types, float32."""
    batch, height, width, _ = features.shape
    poses = nn.Dense(self.capsule_types * POSE_SIZE * POSE_SIZE,
                     dtype=self.dtype, name='pose')(features)
    logits = nn.Dense(self.capsule_types, dtype=self.dtype,
                      name='activation')(features)
    poses = poses.astype(jnp.float32).reshape(
        batch, height, width, self.capsule_types, POSE_SIZE, POSE_SIZE)
    return CapsuleMap(poses, nn.sigmoid(logits.astype(jnp.float32)))


def _em_parameters(module: nn.Module, out_types: int
                   ) -> tuple[jax.Array, jax.Array]:
  """beta_u and beta_a, one each per output type, starting at zero."""
  return tuple(module.param(name, nn.initializers.zeros_init(), (out_types,))
               for name in ('beta_u', 'beta_a'))


class ConvMatrixCapsules(nn.Module):
  """A convolutional capsule layer: K x K x B input capsules to C output
  types at each position, stride S, VALID.

  Holds W `(K, K, B, C, 4, 4)`, one matrix per kernel position, input type
  and output type, shared across positions, and beta_u, beta_a `(C,)`:
  16 K^2 B C + 2 C parameters.

  Each output position routes its own receptive field: its K^2 B input
  capsules' assignments sum to one over its C output types, as most public
  ports do. In the paper a child whose receptive fields overlap shares its
  assignment among the parents of all the positions that see it.
  """

  capsule_types: int
  kernel_size: int = 3
  stride: int = 1
  num_iterations: int = 3
  normalize_cost: bool = True  # `routing.em_routing`
  dtype: Dtype = jnp.float32
  weight_init: Initializer = DEFAULT_WEIGHT_INIT

  @nn.compact
  def __call__(
      self, poses: jax.Array, activations: jax.Array,
      return_coupling: bool = False
  ) -> CapsuleMap:
    """poses `(batch, height, width, B, 4, 4)`, activations `(batch, height,
    width, B)` -> a `CapsuleMap` of C types on `(out_height, out_width)`,
    with the assignment R if `return_coupling`."""
    in_types = poses.shape[3]
    weights = self.param(
        'weights', self.weight_init,
        (self.kernel_size, self.kernel_size, in_types, self.capsule_types,
         POSE_SIZE, POSE_SIZE))
    beta_u, beta_a = _em_parameters(self, self.capsule_types)
    patch_poses, patch_activations = capsule_patches(
        poses, activations, self.kernel_size, self.stride)
    batch, out_height, out_width, in_capsules = patch_activations.shape
    votes = matrix_votes(
        patch_poses.astype(self.dtype),
        weights.reshape(in_capsules, self.capsule_types, POSE_SIZE,
                        POSE_SIZE).astype(self.dtype))
    # Every position of every example is one routing problem.
    routed = routing.em_routing(
        votes.reshape(-1, in_capsules, self.capsule_types, POSE_SIZE,
                      POSE_SIZE),
        patch_activations.reshape(-1, in_capsules), beta_u, beta_a,
        num_iterations=self.num_iterations,
        normalize_cost=self.normalize_cost, return_coupling=return_coupling)
    grid = (batch, out_height, out_width)
    coupling = routed.coupling
    if coupling is not None:
      coupling = coupling.reshape(*grid, in_capsules, self.capsule_types)
    return CapsuleMap(
        routed.poses.reshape(*grid, self.capsule_types, POSE_SIZE, POSE_SIZE),
        routed.activations.reshape(*grid, self.capsule_types), coupling)


class ClassMatrixCapsules(nn.Module):
  """The class capsules: every capsule of the last map votes for each of E
  classes, with coordinate addition.

  Holds W `(D, E, 4, 4)`, one matrix per input type and class, shared across
  positions, and beta_u, beta_a `(E,)`: 16 D E + 2 E parameters. The position
  a shared W cannot see is added to the votes (`coordinate_addition`).
  """

  num_classes: int
  num_iterations: int = 3
  normalize_cost: bool = True  # `routing.em_routing`
  use_coordinate_addition: bool = True
  dtype: Dtype = jnp.float32
  weight_init: Initializer = DEFAULT_WEIGHT_INIT

  @nn.compact
  def __call__(
      self,
      poses: jax.Array,
      activations: jax.Array,
      row_coordinates: jax.Array | np.ndarray | None = None,
      column_coordinates: jax.Array | np.ndarray | None = None,
      return_coupling: bool = False,
  ) -> routing.RoutingOutput:
    """poses `(batch, height, width, D, 4, 4)`, activations `(batch, height,
    width, D)`, the coordinates of `coordinate_addition` -> a
    `routing.RoutingOutput`: poses `(batch, E, 4, 4)`, activations `(batch,
    E)` and, if `return_coupling`, R `(batch, height * width * D, E)` (input
    capsules ordered (row, column, type))."""
    batch, height, width, in_types = activations.shape
    weights = self.param('weights', self.weight_init,
                         (in_types, self.num_classes, POSE_SIZE, POSE_SIZE))
    beta_u, beta_a = _em_parameters(self, self.num_classes)
    votes = matrix_votes(poses.astype(self.dtype), weights.astype(self.dtype))
    # Routing runs in float32 anyway; in bfloat16 the coordinates would be
    # rounded against the votes.
    votes = votes.astype(jnp.promote_types(votes.dtype, jnp.float32))
    if self.use_coordinate_addition:
      votes = coordinate_addition(votes, row_coordinates, column_coordinates)
    in_capsules = height * width * in_types
    return routing.em_routing(
        votes.reshape(batch, in_capsules, self.num_classes, POSE_SIZE,
                      POSE_SIZE),
        activations.reshape(batch, in_capsules), beta_u, beta_a,
        num_iterations=self.num_iterations,
        normalize_cost=self.normalize_cost, return_coupling=return_coupling)


class MatrixCapsNet(nn.Module):
  """The smallNORB network of "Matrix capsules with EM routing" (Fig. 1).

  ReLU conv1 (5x5, stride 2, A channels) -> primary capsules (1x1, B types)
  -> ConvCaps1 (K=3, stride 2, C types) -> ConvCaps2 (K=3, stride 1, D types)
  -> class capsules (E = `num_classes`, coordinate addition), all VALID.
  On 32x32x1 inputs (smallNORB's crop) the maps are 14x14 (conv1 and
  primary), 6x6 (ConvCaps1) and 4x4 (ConvCaps2).

  Parameters, each convolution with a bias, W per (kernel position, input
  type, output type), beta_u and beta_a per output type:

      conv1      25 A + A
      primary    17 B (A + 1)          (16 pose + 1 activation per type)
      ConvCaps1  9 * 16 B C + 2 C
      ConvCaps2  9 * 16 C D + 2 D
      class      16 D E + 2 E

  A = B = C = D = 32, E = 5: 832 + 17,952 + 147,520 + 147,520 + 2,570 =
  316,394 (the paper's "310K"). A = 64, B = 8, C = D = 16, E = 5: 1,664 +
  8,840 + 18,464 + 36,896 + 1,290 = 67,154 (the paper's "68K").

  The class coordinates are the centres of the ConvCaps2 capsules'
  receptive fields in the image, scaled to [0, 1] by its side
  (`receptive_field_centres`): (4 y + 8.5) / 32 on 32x32 inputs.
  """

  A: int = 32  # conv1 channels
  B: int = 32  # primary capsule types
  C: int = 32  # ConvCaps1 capsule types
  D: int = 32  # ConvCaps2 capsule types
  num_classes: int = 5  # E
  num_iterations: int = 3
  normalize_cost: bool = True  # `routing.em_routing`
  dtype: Dtype = jnp.float32  # compute dtype of the convolutions and votes
  conv_method: str = 'auto'  # `Conv2D.method`

  # (kernel_size, stride) of conv1, primary, ConvCaps1, ConvCaps2.
  LAYERS = ((5, 2), (1, 1), (3, 2), (3, 1))

  @nn.compact
  def __call__(
      self, images: jax.Array, return_coupling: bool = False
  ) -> routing.RoutingOutput:
    """images `(batch, height, width, channels)`, pixels in [0, 1] ->
    `routing.RoutingOutput`: class poses `(batch, E, 4, 4)`, activations
    `(batch, E)` in (0, 1), and the class layer's R if `return_coupling`."""
    if images.ndim != 4:
      raise ValueError(
          f'images must be (batch, height, width, channels), got {images.shape}'
      )
    (conv_kernel, conv_stride), _, (kernel1, stride1), (kernel2, stride2) = (
        self.LAYERS)
    features = nn.relu(Conv2D(self.A, conv_kernel, conv_stride,
                              dtype=self.dtype, method=self.conv_method,
                              name='conv1')(images))
    primary = PrimaryMatrixCapsules(self.B, dtype=self.dtype,
                                    name='primary_capsules')(features)
    capsules = primary
    for name, types, kernel_size, stride in (
        ('conv_caps1', self.C, kernel1, stride1),
        ('conv_caps2', self.D, kernel2, stride2)):
      capsules = ConvMatrixCapsules(
          types, kernel_size, stride, self.num_iterations,
          self.normalize_cost, dtype=self.dtype, name=name)(
              capsules.poses, capsules.activations)
    return ClassMatrixCapsules(
        self.num_classes, self.num_iterations, self.normalize_cost,
        dtype=self.dtype, name='class_capsules')(
            capsules.poses, capsules.activations,
            receptive_field_centres(images.shape[1], self.LAYERS),
            receptive_field_centres(images.shape[2], self.LAYERS),
            return_coupling)
