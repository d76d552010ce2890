"""2-D VALID convolution, by patches @ kernel or by the convolution theorem.

`conv2d(..., method=...)`:

- 'patches': image patches times one matrix multiply (below).
- 'fourier': by the convolution theorem (`conv2d_fourier`), with the
  transforms as products with DFT matrices. For the PrimaryCaps convolution
  (9x9 stride 2, 256 -> 256 channels on 20x20) its channel products are 5x
  fewer FLOPs than any direct method: one complex product per frequency
  (10 x 19 of them) instead of one 20,736-long dot product per output
  position (6 x 6) and channel pair.
- 'lax': `lax.conv_general_dilated`, the backend's own convolution (cuDNN
  on GPUs, the TPU's convolution units).
- 'auto' (the default; `resolve_method`): 'lax' off the CPU, where the
  backend's convolutions run on the matrix units and 'patches' would only
  materialise the patches (81 offsets: about 382 MB at the PrimaryCaps
  shape and batch 128); on the CPU 'fourier' where it saves enough
  products and the transforms do not cost more than they save, else
  'patches'.

XLA:CPU computes the input gradient of a strided convolution (e.g. the
PrimaryCaps 9x9 stride-2 conv, 256 -> 256 channels) on a slow generic path:
measured at about 67 s for one batch of 128, against about 1.4 s for the
same convolution, forward and backward, written as patches @ kernel. Here
the patches are strided slices, whose gradients are pads, and the
contraction is a single `dot_general`; every backend runs both well.

Numerically it is the same sum as `lax.conv_general_dilated` with VALID
padding (up to float summation order; `tests/test_convolution.py` compares
both methods).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


def output_size(input_size: int, kernel_size: int, stride: int) -> int:
  """Spatial size of a VALID convolution's output."""
  return (input_size - kernel_size) // stride + 1


def output_shape(height: int, width: int, kernel_size: int, stride: int
                 ) -> tuple[int, int]:
  """`(out_height, out_width)` of a VALID convolution; raises if the kernel
  does not fit."""
  out_height = output_size(height, kernel_size, stride)
  out_width = output_size(width, kernel_size, stride)
  if out_height < 1 or out_width < 1:
    raise ValueError(
        f'a {kernel_size}x{kernel_size} kernel does not fit in a '
        f'{height}x{width} input'
    )
  return out_height, out_width


def extract_patches(images: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """All VALID `kernel_size x kernel_size` patches, flattened.

  Args:
    images: `(batch, height, width, channels)`.
    kernel_size: the square window's side.
    stride: the step between windows in both directions.

  Returns:
    `(batch, out_height, out_width, kernel_size * kernel_size * channels)`,
    ordered (kernel_row, kernel_col, channel), the order of an HWIO kernel
    reshaped to `(-1, out_channels)`.
  """
  batch, height, width, channels = images.shape
  out_height, out_width = output_shape(height, width, kernel_size, stride)
  # Strided slices, whose transposes are pads, cheap on every backend (unlike
  # the transpose of a strided convolution on CPU). Columns first, then rows
  # of those: 2 x size slices instead of one per offset (size^2), which
  # XLA:CPU runs as separate operations.
  by_columns = jnp.stack([
      lax.slice(images, (0, 0, col, 0),
                (batch, height, col + stride * (out_width - 1) + 1, channels),
                (1, 1, stride, 1))
      for col in range(kernel_size)], axis=3)
  patches = jnp.stack([
      lax.slice(by_columns, (0, row, 0, 0, 0),
                (batch, row + stride * (out_height - 1) + 1, out_width,
                 kernel_size, channels),
                (1, stride, 1, 1, 1))
      for row in range(kernel_size)], axis=3)
  return patches.reshape(
      batch, out_height, out_width, kernel_size * kernel_size * channels
  )


def extract_tap_major_patches(images: jax.Array, kernel_size: int,
                              stride: int) -> jax.Array:
  """`extract_patches` of one-channel images with the taps as rows.

  Args:
    images: `(batch, height, width, 1)`.
    kernel_size: the square window's side.
    stride: the step between windows in both directions.

  Returns:
    `(kernel_size * kernel_size, batch * out_height * out_width)`: row
    `r * kernel_size + c` holds tap `(r, c)` of every window, windows in
    `(batch, out_y, out_x)` order; the transpose of `extract_patches`'s
    result reshaped to `(-1, kernel_size**2)`.
  """
  # Sliced into this order rather than transposed from `extract_patches`:
  # XLA folds a transpose into the product that reads it, which then
  # contracts the pixel-major patches again (`lhs_contracting_dims={0}`).
  batch, height, width, channels = images.shape
  if channels != 1:
    raise ValueError(f'tap-major patches take one channel, got {channels}')
  out_height, out_width = output_shape(height, width, kernel_size, stride)
  images = images[..., 0]
  by_columns = jnp.stack([
      lax.slice(images, (0, 0, col),
                (batch, height, col + stride * (out_width - 1) + 1),
                (1, 1, stride))
      for col in range(kernel_size)])
  patches = jnp.stack([
      lax.slice(by_columns, (0, 0, row, 0),
                (kernel_size, batch, row + stride * (out_height - 1) + 1,
                 out_width),
                (1, 1, stride, 1))
      for row in range(kernel_size)])
  return patches.reshape(kernel_size * kernel_size,
                         batch * out_height * out_width)


METHODS = ('auto', 'patches', 'fourier', 'lax')


def _is_float32(compute_dtype: jnp.dtype | None) -> bool:
  return compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32


def float32_einsum(spec: str, lhs: jax.Array, rhs: jax.Array,
                   compute_dtype: jnp.dtype | None = None) -> jax.Array:
  """`jnp.einsum(spec, lhs, rhs)` of `compute_dtype` inputs, accumulated
  and returned in float32.

  With a narrower compute dtype (bfloat16) the backward pass rounds the
  float32 cotangent to it too, so that both gradient products are
  bfloat16 x bfloat16 -> float32 products, as PyTorch's autocast does.
  Autodiff's own rule would multiply the float32 cotangent by a bfloat16
  operand, which XLA:CPU computes as a float32 product with a bfloat16
  result: the slow path (PrimaryCaps by the Fourier method, forward +
  backward: 1.9 s against 1.1 s in float32 on a CPU with AMX).

  Every index of `spec` must appear in two of its three terms, or in all
  three for a batch index (e.g. 'fmk,fkn->fmn'), so that each gradient is
  an einsum too. The backward pass keeps the narrow lhs with the indices
  that the rhs gradient contracts last (see `_narrow_einsum_forward`).

  Args:
    spec: two operands, explicit output.
    lhs, rhs: the operands, of any float dtype.
    compute_dtype: the products' input dtype; None: float32.

  Returns:
    float32; the gradients come back in `lhs`'s and `rhs`'s dtypes.
  """
  # Both paths take float32 operands: autodiff casts the gradients back to
  # the operands' own dtypes.
  lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  if _is_float32(compute_dtype):
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)
  return _narrow_einsum(spec, jnp.dtype(compute_dtype), lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _narrow_einsum(spec, compute_dtype, lhs, rhs):
  """float32 `lhs`, `rhs` -> float32 einsum of their `compute_dtype` casts."""
  return jnp.einsum(spec, lhs.astype(compute_dtype), rhs.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


def _split_spec(spec: str) -> tuple[str, str, str]:
  lhs_spec, rest = spec.split(',')
  rhs_spec, out_spec = rest.split('->')
  return lhs_spec, rhs_spec, out_spec


def _lhs_order_for_rhs_gradient(spec: str) -> str:
  """The lhs's indices in the order that makes the rhs gradient's product,
  `lhs^T @ cotangent`, canonical: batch indices (in all three terms), then
  the gradient's rows (shared with rhs), then the contracted ones (shared
  with the output), last. 'fmk,fkn->fmn' -> 'fkm'."""
  lhs_spec, rhs_spec, out_spec = _split_spec(spec)
  shared = [index for index in lhs_spec if index in rhs_spec]
  batch = [index for index in shared if index in out_spec]
  rows = [index for index in shared if index not in out_spec]
  contracted = [index for index in lhs_spec if index not in rhs_spec]
  return ''.join(batch + rows + contracted)


def _materialized_transpose(array: jax.Array, axes: tuple[int, ...]
                            ) -> jax.Array:
  """`array.transpose(axes)` written out in that order in memory.

  XLA:CPU otherwise keeps a transpose as a layout of the same buffer, and
  the product reading it gets the strided operand back. Flattening behind
  an optimization barrier needs the transposed order itself.
  """
  transposed = array.transpose(axes)
  return jax.lax.optimization_barrier(transposed.reshape(-1)).reshape(
      transposed.shape)


def _narrow_einsum_forward(spec, compute_dtype, lhs, rhs):
  # The rhs gradient contracts the lhs over the indices it shares with the
  # output (the batch of the channel products, 'fmk,fmn->fkn'), which in
  # the lhs's own order XLA:CPU runs as a plain product and not through
  # YNNPACK's bfloat16 kernels (AMX where the CPU has it): the lhs is kept
  # for the backward pass with those indices last. Measured on a 2-core
  # Xeon with AMX, the bfloat16 MNIST training step, both versions
  # compiled in one process and timed alternately (12 and 14 rounds of 3
  # steps): 404 against 458 ms and 390 against 435 ms.
  lhs_spec, _, _ = _split_spec(spec)
  order = _lhs_order_for_rhs_gradient(spec)
  lhs_narrow = lhs.astype(compute_dtype)
  if order != lhs_spec:
    lhs_narrow = _materialized_transpose(
        lhs_narrow, tuple(lhs_spec.index(index) for index in order))
  residuals = (lhs_narrow, rhs.astype(compute_dtype))
  return _narrow_einsum(spec, compute_dtype, lhs, rhs), residuals


def _narrow_einsum_backward(spec, compute_dtype, residuals, cotangent):
  lhs_reordered, rhs = residuals
  lhs_spec, rhs_spec, out_spec = _split_spec(spec)
  order = _lhs_order_for_rhs_gradient(spec)
  cotangent = cotangent.astype(compute_dtype)
  lhs_gradient = jnp.einsum(f'{out_spec},{rhs_spec}->{lhs_spec}', cotangent,
                            rhs, preferred_element_type=jnp.float32)
  rhs_gradient = jnp.einsum(f'{order},{out_spec}->{rhs_spec}', lhs_reordered,
                            cotangent, preferred_element_type=jnp.float32)
  return lhs_gradient, rhs_gradient


_narrow_einsum.defvjp(_narrow_einsum_forward, _narrow_einsum_backward)


def _batched_matmul(matrix: np.ndarray, operand: jax.Array) -> jax.Array:
  """`matrix @ operand[u]` for every u: `(m, k) x (U, k, n) -> (U, m, n)`.

  The constant matrix is broadcast to `(U, m, k)` (it is small) so that the
  product is a canonical batched GEMM, batch axis first in both operands:
  XLA:CPU then multiplies in place instead of transposing `operand`.
  """
  batch = operand.shape[0]
  matrix = jnp.broadcast_to(jnp.asarray(matrix, jnp.float32),
                            (batch, *matrix.shape))
  return jnp.einsum('umk,ukn->umn', matrix, operand)


def _complex_rotation(phases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For `z = a + ib` held as rows `(a rows; b rows)`: the matrices that give
  the real and the imaginary parts of `sum_k z[k] exp(i phases[:, k])`:

      Re = [cos, -sin] @ (a; b),   Im = [sin, cos] @ (a; b).
  """
  cos, sin = np.cos(phases), np.sin(phases)
  return (np.concatenate([cos, -sin], axis=1),
          np.concatenate([sin, cos], axis=1))


def _real_dft2(signal: jax.Array, row_phases: np.ndarray,
               column_phases: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The 2-D transform of a real signal, as (real, imaginary) parts:

      S[u, v, x] = sum_{h, w} signal[h, w, x]
                   * exp(i (row_phases[u, h] + column_phases[v, w]))

  Rows first (real to complex), then columns (complex to complex). Every
  stage is a GEMM whose operands are already laid out for it: the signal's
  trailing axis `x` (batch x channels) is the GEMM's long side and never
  moves.

  Args:
    signal: `(rows, columns, x)`.
    row_phases: `(U, rows)`.
    column_phases: `(V, columns)`.

  Returns:
    real and imaginary parts, each `(U, V, x)`, float32.
  """
  rows, columns, rest = signal.shape
  num_u = row_phases.shape[0]
  # (U, 2, rows): cos and sin of every row phase, real part first.
  along_rows = np.stack([np.cos(row_phases), np.sin(row_phases)], axis=1)
  by_rows = jnp.dot(
      jnp.asarray(along_rows.reshape(2 * num_u, rows), jnp.float32),
      signal.reshape(rows, columns * rest))
  # (U, 2 * columns, x): real then imaginary part of every column.
  by_rows = by_rows.reshape(num_u, 2 * columns, rest)
  to_real, to_imag = _complex_rotation(column_phases)
  return (_batched_matmul(to_real, by_rows),
          _batched_matmul(to_imag, by_rows))


def _complex_matmul(lhs_real: jax.Array, lhs_imag: jax.Array,
                    rhs_real: jax.Array, rhs_imag: jax.Array,
                    compute_dtype: jnp.dtype | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Per frequency f, `lhs[f] @ rhs[f]` of complex matrices, by Gauss's
  three real products:

      (a + ib)(c + id) = (ac - bd) + i(ad + bc),
      P = (a + b) c,  Q = a (d - c),  R = b (c + d):  ac - bd = P - R,
      ad + bc = P + Q.

  Args:
    lhs_real, lhs_imag: `(frequencies, m, k)`.
    rhs_real, rhs_imag: `(frequencies, k, n)`.
    compute_dtype: the real products' input dtype (`float32_einsum`);
      None: float32. (With k = 1 the products are elementwise, in float32.)

  Returns:
    real and imaginary parts, each `(frequencies, m, n)`, float32.
  """
  if lhs_real.shape[-1] == 1:
    # k = 1 (one input channel): outer products, elementwise, which XLA
    # fuses with what surrounds them, where each would otherwise be a
    # separate GEMM call with a contraction of length 1 (LeNet-5's first
    # convolution: its training step 3-10% faster, three comparisons
    # alternating in one process).
    lhs_real, lhs_imag, rhs_real, rhs_imag = (
        value.astype(jnp.float32)
        for value in (lhs_real, lhs_imag, rhs_real, rhs_imag))
    return (lhs_real * rhs_real - lhs_imag * rhs_imag,
            lhs_real * rhs_imag + lhs_imag * rhs_real)
  product = functools.partial(float32_einsum, 'fmk,fkn->fmn',
                              compute_dtype=compute_dtype)
  p = product(lhs_real + lhs_imag, rhs_real)
  q = product(lhs_real, rhs_imag - rhs_real)
  r = product(lhs_imag, rhs_real + rhs_imag)
  return p - r, p + q


def _fourier_grid(out_height: int, out_width: int, size: int,
                  stride: int) -> tuple[int, int]:
  """`(N_h, N_w)`: the input window the strided outputs read."""
  return stride * (out_height - 1) + size, stride * (out_width - 1) + size


def conv2d_fourier(images: jax.Array, kernel: jax.Array, stride: int = 1,
                   compute_dtype: jnp.dtype | None = None) -> jax.Array:
  """VALID 2-D convolution (cross-correlation) by the convolution theorem.

  Only the `N_h x N_w` input window that the strided outputs read is used,
  `N = stride * (out - 1) + size` on each axis. With `F` the 2-D DFT on that
  grid and the kernel zero-padded to it, for every channel pair

      full[b, y, x, o] = sum_i F^-1( F(images[b, :, :, i])
                                     * conj(F(kernel[:, :, i, o])) )[y, x]

  equals the VALID correlation wherever the kernel fits (the circular
  wrap-around reaches no output we keep). The sum over input channels is one
  complex `(batch x in) @ (in x out)` product per frequency, `(N_h // 2 + 1)
  x N_w` of them (a real signal's spectrum is Hermitian), done as three
  real products (`_complex_matmul`).

  The transforms are products with DFT matrices, one axis at a time, not
  FFTs: the grids are small (19 x 19 for PrimaryCaps), the inverse is
  evaluated only at the `stride`-spaced outputs, and every step is a matrix
  product, as is its gradient. Each is laid out as a canonical GEMM over the
  `(batch x channels)` columns, so the only data moved between them is one
  transpose of the input window to `(N_h, N_w, batch, in)` and one of the
  output back to NHWC; the spectra come out as `(frequencies, batch, in)`
  and `(frequencies, in, out)`, the channel products' own layout.

  PrimaryCaps (9x9 stride 2, 256 -> 256 channels on 20x20, batch 128): the
  channel products are 9.6 GFLOP forward against 48.9 GFLOP for any direct
  method; the transforms add about 2.9 GFLOP.

  Args:
    images: `(batch, height, width, in_channels)`, NHWC.
    kernel: `(size, size, in_channels, out_channels)`, HWIO.
    stride: the same in both directions.
    compute_dtype: the input dtype of the channel products (e.g.
      bfloat16); None: float32. The transforms always run in float32.

  Returns:
    `(batch, out_height, out_width, out_channels)`, float32.
  """
  batch, height, width, in_channels = images.shape
  size, _, _, out_channels = kernel.shape
  out_height, out_width = output_shape(height, width, size, stride)
  grid_height, grid_width = _fourier_grid(out_height, out_width, size, stride)
  # Frequencies: half the rows u (Hermitian symmetry), all columns v.
  rows_u = np.arange(grid_height // 2 + 1)
  columns_v = np.arange(grid_width)
  row_angle = 2 * np.pi / grid_height
  column_angle = 2 * np.pi / grid_width
  frequencies = len(rows_u) * len(columns_v)

  # F(images): exp(-i ...) over the grid.
  window = images[:, :grid_height, :grid_width].astype(jnp.float32)
  images_real, images_imag = _real_dft2(
      window.transpose(1, 2, 0, 3).reshape(grid_height, grid_width, -1),
      -row_angle * np.outer(rows_u, np.arange(grid_height)),
      -column_angle * np.outer(columns_v, np.arange(grid_width)))
  # conj(F(kernel)) = exp(+i ...) over the size x size taps.
  taps = np.arange(size)
  kernel_real, kernel_imag = _real_dft2(
      kernel.astype(jnp.float32).reshape(size, size, -1),
      row_angle * np.outer(rows_u, taps),
      column_angle * np.outer(columns_v, taps))

  product_real, product_imag = _complex_matmul(
      images_real.reshape(frequencies, batch, in_channels),
      images_imag.reshape(frequencies, batch, in_channels),
      kernel_real.reshape(frequencies, in_channels, out_channels),
      kernel_imag.reshape(frequencies, in_channels, out_channels),
      compute_dtype)
  # (U, 2 * V, batch x out): real then imaginary part of every column.
  product = jnp.stack(
      [product_real.reshape(len(rows_u), len(columns_v), -1),
       product_imag.reshape(len(rows_u), len(columns_v), -1)], axis=1
  ).reshape(len(rows_u), 2 * len(columns_v), -1)

  # F^-1 at the kept outputs only: exp(+i ...) along columns, then the real
  # part along rows, where rows 1..N_h/2 stand for their conjugate mirror
  # images too.
  to_real, to_imag = _complex_rotation(
      column_angle * np.outer(stride * np.arange(out_width), columns_v))
  by_columns = _batched_matmul(np.concatenate([to_real, to_imag]), product)
  mirrored = np.where((rows_u == 0) | (2 * rows_u == grid_height), 1.0, 2.0)
  output_phases = row_angle * np.outer(rows_u, stride * np.arange(out_height))
  # (out_height, U, 2): the real part of z exp(i phase) is a cos - b sin.
  real_part = np.stack([np.cos(output_phases), -np.sin(output_phases)],
                       axis=-1).transpose(1, 0, 2)
  real_part *= mirrored[None, :, None] / (grid_height * grid_width)
  output = jnp.dot(
      jnp.asarray(real_part.reshape(out_height, 2 * len(rows_u)),
                  jnp.float32),
      by_columns.reshape(2 * len(rows_u), -1))
  return output.reshape(out_height, out_width, batch, out_channels
                        ).transpose(2, 0, 1, 3)


# When 'auto' picks the Fourier method on the CPU (`python
# benchmarks/conv_methods.py --steps lenet5,efficient_capsnet,capsnet`;
# 2-core AMD EPYC with AVX-512). Forward + backward of single convolutions,
# patches time / Fourier time, and the product ratio below:
#   PrimaryCaps 9x9/2 256->256 on 20x20:  3.85  (ratio 5.1)
#   baseline CNN 5x5 256->256 on 32x32:   8.15  (ratio 12)
#   Efficient-CapsNet 3x3/2 64->128 on 20x20: 0.30 (ratio 1.3)
#   LeNet-5's 1->6 and 6->16: 1.06 and 0.92, the same within the noise
# With few input channels the products that Fourier saves are few, and the
# transforms of the output maps cost what they save. Few inputs feeding
# many maps (conv1, 1->256, 9x9 on 28x28) are faster by Fourier alone
# (1.35), but not inside the CapsNet step (393 ms by 'auto', 397 ms with
# conv1 by Fourier too). Efficient-CapsNet's 5x5 1->32 (ratio 11.4) and
# 3x3 64->64 (ratio 4.5) took 0.37-0.77 and 0.96-1.13 of their Fourier
# times alone on three CPUs; its whole step with both by patches: 72.4
# and 71.7 ms against 78.2 and 77.7 ms with both by Fourier (two
# processes, 15 alternating rounds of 3 steps each, 2-core Xeon with AMX),
# 58.2 against 59.1 ms on the AMD EPYC above. So Fourier needs both: a
# product ratio of 4 or more and at least 128 input channels.
FOURIER_MIN_PRODUCT_RATIO = 4
FOURIER_MIN_IN_CHANNELS = 128


def fourier_product_ratio(height: int, width: int, kernel_size: int,
                          stride: int = 1) -> float:
  """Real multiply-adds per channel pair of a direct method over those of
  the Fourier method's channel products (`conv2d_fourier`):

      size^2 * out_height * out_width / (3 * (N_h // 2 + 1) * N_w)

  with `N = stride * (out - 1) + size` the grid the strided outputs read,
  and three real products per complex one."""
  out_height, out_width = output_shape(height, width, kernel_size, stride)
  grid_height, grid_width = _fourier_grid(out_height, out_width, kernel_size,
                                          stride)
  frequencies = (grid_height // 2 + 1) * grid_width
  return kernel_size**2 * out_height * out_width / (3 * frequencies)


def resolve_method(method: str, compute_dtype: jnp.dtype | None,
                   images_shape: tuple[int, ...],
                   kernel_shape: tuple[int, ...], stride: int = 1,
                   platform: str | None = None) -> str:
  """The method `conv2d` runs for `method` ('auto' resolved).

  'auto' -> 'lax' off the CPU. On the CPU 'fourier' where it saves
  products (`fourier_product_ratio` >= 4) and the layer has 128 or more
  input channels, else 'patches'.

  Args:
    method: one of METHODS.
    compute_dtype: the matmul input dtype (None: the inputs' own).
    images_shape: `(batch, height, width, in_channels)`.
    kernel_shape: `(size, size, in_channels, out_channels)`.
    stride: the same in both directions.
    platform: 'cpu', 'gpu', 'tpu', ...; None: `jax.default_backend()`.
  """
  del compute_dtype  # Every method takes it (see `conv2d`).
  if method not in METHODS:
    raise ValueError(f'conv method {method!r} must be one of {METHODS}')
  if method != 'auto':
    return method
  platform = jax.default_backend() if platform is None else platform
  if platform != 'cpu':
    return 'lax'
  _, height, width, in_channels = images_shape
  kernel_size, _, _, out_channels = kernel_shape
  if (fourier_product_ratio(height, width, kernel_size, stride) <
      FOURIER_MIN_PRODUCT_RATIO):
    return 'patches'
  if in_channels < FOURIER_MIN_IN_CHANNELS:
    return 'patches'
  return 'fourier'


def conv2d_lax(images: jax.Array, kernel: jax.Array, stride: int = 1
               ) -> jax.Array:
  """VALID 2-D convolution by `lax.conv_general_dilated`, accumulated and
  returned in float32.

  Args:
    images: `(batch, height, width, in_channels)`, NHWC.
    kernel: `(size, size, in_channels, out_channels)`, HWIO.
    stride: the same in both directions.

  Returns:
    `(batch, out_height, out_width, out_channels)`, float32.
  """
  return lax.conv_general_dilated(
      images, kernel, (stride, stride), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      preferred_element_type=jnp.float32)


def _patches_conv(images: jax.Array, kernel: jax.Array, stride: int,
                  compute_dtype: jnp.dtype | None = None) -> jax.Array:
  """`conv2d` by patches: `(batch, h, w, taps) x (taps, out)`."""
  kernel_size, _, _, out_channels = kernel.shape
  patches = extract_patches(images, kernel_size, stride)
  return float32_einsum('bhwk,ko->bhwo', patches,
                        kernel.reshape(-1, out_channels), compute_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _one_channel_patches_conv(images: jax.Array, kernel: jax.Array,
                              stride: int) -> jax.Array:
  """`_patches_conv` of float32 one-channel images, whose kernel gradient
  is a product with the taps as rows.

  That gradient contracts over every pixel of the batch. From
  `(batch * h * w, taps)` patches XLA:CPU first transposes the cotangent,
  `(batch * h * w, out)`: at CapsNet's conv1 (batch 128, 256 maps of 20 x
  20) a 52 MB copy. The tangent below multiplies `extract_tap_major_patches`
  instead, whose transpose is the canonical `(taps, pixels) x (pixels,
  out)` product: the float32 training step 31-40 ms (6-7%) faster, three
  comparisons alternating in one process. The value is still the
  pixel-major product, the form of XLA:CPU's fastest path, so evaluation
  (no tangent) is unchanged. (bfloat16 keeps `_patches_conv`: its fast
  products take only the pixel-major form.)
  """
  return _patches_conv(images, kernel, stride)


@_one_channel_patches_conv.defjvp
def _one_channel_patches_conv_jvp(stride, primals, tangents):
  images, kernel = primals
  images_tangent, kernel_tangent = tangents
  kernel_size, _, _, out_channels = kernel.shape
  outputs = _patches_conv(images, kernel, stride)
  taps = extract_tap_major_patches(images, kernel_size, stride)
  by_kernel = jnp.einsum('kp,ko->po', taps,
                         kernel_tangent.reshape(-1, out_channels),
                         preferred_element_type=jnp.float32)
  return outputs, (by_kernel.reshape(outputs.shape)
                   + _patches_conv(images_tangent, kernel, stride))


def conv2d(
    images: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    compute_dtype: jnp.dtype | None = None,
    method: str = 'auto',
) -> jax.Array:
  """VALID 2-D convolution, `lax.conv_general_dilated`'s maths.

      out[b, y, x, o] = sum_{r, c, i} images[b, s*y + r, s*x + c, i]
                                     * kernel[r, c, i, o]

  >>> import jax, jax.numpy as jnp
  >>> images = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  >>> kernel = jax.random.normal(jax.random.key(1), (9, 9, 1, 8))
  >>> conv2d(images, kernel, stride=2, method='patches').shape
  (2, 10, 10, 8)

  Args:
    images: `(batch, height, width, in_channels)`, NHWC.
    kernel: `(size, size, in_channels, out_channels)`, HWIO, square.
    stride: the same in both directions.
    compute_dtype: dtype of the matmul inputs (e.g. bfloat16); the sum is
      accumulated and returned in float32. None keeps the inputs' dtype.
    method: 'patches', 'fourier', 'lax' or 'auto' (`resolve_method`).

  Returns:
    `(batch, out_height, out_width, out_channels)`, float32.
  """
  kernel_size, kernel_width, in_channels, _ = kernel.shape
  if kernel_size != kernel_width:
    raise ValueError(f'kernel must be square, got shape {kernel.shape}')
  if images.shape[-1] != in_channels:
    raise ValueError(
        f'images have {images.shape[-1]} channels, kernel expects '
        f'{in_channels}'
    )
  method = resolve_method(method, compute_dtype, images.shape, kernel.shape,
                          stride)
  if method == 'fourier':
    return conv2d_fourier(images, kernel, stride, compute_dtype)
  if method == 'lax':
    if compute_dtype is not None:
      images = images.astype(compute_dtype)
      kernel = kernel.astype(compute_dtype)
    return conv2d_lax(images, kernel, stride)
  if in_channels == 1 and _is_float32(compute_dtype):
    return _one_channel_patches_conv(images.astype(jnp.float32),
                                     kernel.astype(jnp.float32), stride)
  return _patches_conv(images, kernel, stride, compute_dtype)
