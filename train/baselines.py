"""Convolutional baselines for the paper's comparisons: its CNN and LeNet-5.

Both are linen modules called like `capsjax.CapsNet`, `model(images,
labels=None)`, so the training loop drives every model the same way; the
labels are ignored (there is no decoder) and the output is a
`ClassifierOutput` of class logits. Dropout is on only with
`deterministic=False`, which needs a 'dropout' rng.

`BaselineCNN` is the paper's baseline (section 5): three 5x5 convolutions of
256, 256 and 128 channels, stride 1, ReLU; fully connected layers of 328 and
192 units; dropout; 10 logits. The paper gives 35.4M parameters and no
pooling. With SAME padding and no pooling we get 35,445,522 parameters on
28x28 inputs, which matches (the first fully connected layer alone has
28 * 28 * 128 * 328 + 328 = 32,915,784). Any pooling would shrink that
layer by 4x per 2x2 pool (two 2x2 pools give 4.5M in all; the official
code's own baseline, 2 convs of 512 and 256 with pooling and one FC of 1024,
is yet another network), so the default is no pooling; `pool_after`
adds 2x2 max-pooling after chosen conv layers.

`LeNet5` is LeCun et al. (1998) with full connections between feature maps:
conv 5x5 6 (SAME on 28x28, the classic 32x32 input's VALID), 2x2 pool,
conv 5x5 16 (VALID), 2x2 pool, FC 120, FC 84, 10 logits: 61,706 parameters
on 28x28. ReLU and max-pooling by default (the modern variant most
tutorials measure); `activation='tanh'`, `pooling='avg'` for the original
style.

Convolutions: `conv_implementation` is 'lax' (`nn.Conv`, the module
default) or a `capsjax.convolution` method on a zero-padded input (same
parameters, same maths). LeNet-5 can also run its convolutions and pooling
with the batch as the minor axis (`layout='batch_minor'`, the default on
the CPU with 'auto' or 'patches' convolutions; same parameters, same
maths): its 6 and 16 channels are too few to fill a CPU's vector lanes, the
batch's 128 fill them (`conv_batch_minor`). The training program passes
`config.model.conv_method` ('auto' by default: the convolution theorem for
the 256-channel layers of BaselineCNN on CPU, patches elsewhere). Measured
as one jitted SGD step at batch 32 on 28x28 (2 CPU cores, another job
running): BaselineCNN 17.5 s per step with lax, 3.2 s with 'fourier'
(in training at batch 128 with 'auto': 250 steps and a validation pass in
19.1 min). Earlier, at batch 8: lax 1.64-1.77 s against 1.77-1.81 s by
patches; LeNet-5 3 ms per step either way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import capsjax

Dtype = Any
CONV_IMPLEMENTATIONS = ('lax', *capsjax.convolution.METHODS)


class ClassifierOutput(NamedTuple):
  """What the baselines return; `reconstructions` is always None."""

  logits: jax.Array
  reconstructions: jax.Array | None = None


def pad_same(images: jax.Array, kernel_size: int) -> jax.Array:
  """Zeros around the spatial axes (1 and 2) for a SAME stride-1
  convolution: k - 1 in all, the extra one after, as `nn.Conv` pads."""
  before = (kernel_size - 1) // 2
  after = (kernel_size - 1) - before
  return jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)))


def conv(features: int, kernel_size: int, images: jax.Array,
         implementation: str, dtype: Dtype, name: str,
         padding: str = 'SAME') -> jax.Array:
  """A stride-1 convolution with bias, 'SAME' or 'VALID', as `nn.Conv`
  ('lax') or `capsjax.Conv2D` ('auto', 'patches', 'fourier': its `method`);
  parameters 'kernel' (HWIO) and 'bias' either way."""
  if implementation == 'lax':
    return nn.Conv(features, (kernel_size, kernel_size), padding=padding,
                   dtype=dtype, name=name)(images).astype(jnp.float32)
  if implementation not in CONV_IMPLEMENTATIONS:
    raise ValueError(f'conv implementation {implementation!r} must be one of '
                     f'{CONV_IMPLEMENTATIONS}')
  if padding == 'SAME':
    images = pad_same(images, kernel_size)
  return capsjax.Conv2D(features, kernel_size, dtype=dtype,
                        method=implementation, name=name)(images)


def pool_2x2(images: jax.Array, kind: str) -> jax.Array:
  """2x2 pooling at stride 2 with 'SAME' padding, as `nn.max_pool` /
  `nn.avg_pool(..., (2, 2), strides=(2, 2), padding='SAME')`:
  `(batch, h, w, c)` -> `(batch, ceil(h / 2), ceil(w / 2), c)`; the same
  for `(c, h, w, batch)` (the spatial axes are 1 and 2 in both).

  An odd side is padded at its end (with -inf for 'max'; with zeros for
  'avg', which then divides by 4, as flax counts the padding). The windows
  do not overlap, so the pooling is a reshape to `(batch, h / 2, 2, w / 2,
  2, c)` and elementwise operations on the four corners, which XLA:CPU
  fuses, where `reduce_window` and the `select_and_scatter` of its gradient
  were a quarter of LeNet-5's training step (docs/speed.md). Gradient of
  'max': the maximum's position gets it; equal maxima share it, summing to
  one (`select_and_scatter` gives it to one of them). After a ReLU that
  happens where the ReLU's own gradient is zero.
  """
  if kind not in ('max', 'avg'):
    raise ValueError(f"pooling {kind!r} must be 'max' or 'avg'")
  leading, height, width, trailing = images.shape
  padding = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
  if kind == 'max':
    padded = jnp.pad(images, padding, constant_values=-jnp.inf)
  else:
    padded = jnp.pad(images, padding)
  windows = padded.reshape(leading, (height + 1) // 2, 2, (width + 1) // 2, 2,
                           trailing)
  corners = [windows[:, :, row, :, column]
             for row in (0, 1) for column in (0, 1)]
  if kind == 'max':
    # Pairwise: the gradient of `jnp.maximum` is elementwise (a tie
    # halves it), where that of a reduction counts the ties in a reduction
    # of its own.
    return jnp.maximum(jnp.maximum(corners[0], corners[1]),
                       jnp.maximum(corners[2], corners[3]))
  return (corners[0] + corners[1] + corners[2] + corners[3]) / 4


LAYOUTS = ('auto', 'nhwc', 'batch_minor')


def conv_batch_minor(images: jax.Array, kernel: jax.Array,
                     compute_dtype: Dtype | None = None) -> jax.Array:
  """VALID stride-1 convolution of `(in_channels, height, width, batch)`
  activations by an HWIO kernel, as one matrix product:

      out[o, y, x, b] = sum_{r, c, i} kernel[r, c, i, o]
                                      * images[i, y + r, x + c, b]

  The patches are `(size * size * in_channels, out_height * out_width *
  batch)`, rows ordered as the kernel's `(r, c, i)`; a product of the
  `(out_channels, size * size * in_channels)` kernel by them gives the
  output in the same layout. Accumulated and returned in float32 (inputs
  cast to `compute_dtype`, as `capsjax.convolution.conv2d`).

  Returns:
    `(out_channels, out_height, out_width, batch)`.
  """
  size, _, in_channels, out_channels = kernel.shape
  if images.shape[0] != in_channels:
    raise ValueError(f'images have {images.shape[0]} channels (axis 0), '
                     f'kernel expects {in_channels}')
  _, height, width, batch = images.shape
  out_height, out_width = height - size + 1, width - size + 1
  # Columns first, then rows of those: 2 x size slices, not size^2
  # (as `capsjax.convolution.extract_patches`).
  by_columns = jnp.stack([images[:, :, column:column + out_width]
                          for column in range(size)])
  patches = jnp.stack([by_columns[:, :, row:row + out_height]
                       for row in range(size)])
  patches = patches.reshape(size * size * in_channels,
                            out_height * out_width * batch)
  outputs = capsjax.convolution.float32_einsum(
      'ko,km->om', kernel.reshape(-1, out_channels), patches, compute_dtype)
  return outputs.reshape(out_channels, out_height, out_width, batch)


class BatchMinorConv(nn.Module):
  """A stride-1 convolution with bias on `(channels, h, w, batch)`
  activations; the same parameters ('kernel' HWIO, 'bias') and
  initialisers as `nn.Conv` and `capsjax.Conv2D`."""

  features: int
  kernel_size: int
  padding: str = 'SAME'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.padding not in ('SAME', 'VALID'):
      raise ValueError(f"padding {self.padding!r} must be 'SAME' or 'VALID'")
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, images.shape[0],
                         self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    if self.padding == 'SAME':
      images = pad_same(images, self.kernel_size)
    outputs = conv_batch_minor(images, kernel, self.dtype)
    return outputs + bias[:, None, None, None]


def resolve_layout(layout: str, conv_implementation: str,
                   platform: str | None = None) -> str:
  """The layout LeNet-5 runs for `layout` ('auto' resolved): 'batch_minor'
  on the CPU when its convolutions are by patches ('auto' or 'patches'),
  else 'nhwc' (cuDNN and TPU convolutions take channels-minor
  activations)."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout {layout!r} must be one of {LAYOUTS}')
  by_patches = conv_implementation in ('auto', 'patches')
  if layout == 'batch_minor' and not by_patches:
    raise ValueError("layout 'batch_minor' convolves by patches: "
                     "conv_implementation must be 'auto' or 'patches', got "
                     f'{conv_implementation!r}')
  if layout != 'auto':
    return layout
  platform = jax.default_backend() if platform is None else platform
  return 'batch_minor' if platform == 'cpu' and by_patches else 'nhwc'


class BaselineCNN(nn.Module):
  """The paper's baseline CNN (35,445,522 parameters on 28x28x1)."""

  num_classes: int = 10
  conv_features: Sequence[int] = (256, 256, 128)
  kernel_size: int = 5
  hidden_sizes: Sequence[int] = (328, 192)
  dropout_rate: float = 0.5
  # Indices of conv layers followed by 2x2 max-pooling; none in the paper.
  pool_after: Sequence[int] = ()
  conv_implementation: str = 'lax'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, labels: jax.Array | None = None, *,
               deterministic: bool = True) -> ClassifierOutput:
    """images `(batch, h, w, c)` -> logits `(batch, num_classes)`.

    `labels` is accepted for the CapsNet call signature and ignored.
    """
    del labels
    hidden = images
    for index, features in enumerate(self.conv_features):
      hidden = nn.relu(conv(features, self.kernel_size, hidden,
                            self.conv_implementation, self.dtype,
                            f'conv{index + 1}'))
      if index in self.pool_after:
        hidden = pool_2x2(hidden, 'max')
    hidden = hidden.reshape(hidden.shape[0], -1)
    for index, size in enumerate(self.hidden_sizes):
      hidden = nn.relu(nn.Dense(size, dtype=self.dtype,
                                name=f'fc{index + 1}')(hidden))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(hidden)
    return ClassifierOutput(logits.astype(jnp.float32))


class LeNet5(nn.Module):
  """LeNet-5 (61,706 parameters on 28x28x1)."""

  num_classes: int = 10
  activation: str = 'relu'  # or 'tanh'
  pooling: str = 'max'  # or 'avg'
  conv_implementation: str = 'lax'
  # 'auto', 'nhwc' or 'batch_minor' (`resolve_layout`).
  layout: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, labels: jax.Array | None = None, *,
               deterministic: bool = True) -> ClassifierOutput:
    """images `(batch, h, w, c)` -> logits `(batch, num_classes)`."""
    del labels, deterministic  # No dropout in LeNet-5.
    if self.activation not in ('relu', 'tanh'):
      raise ValueError(f"activation {self.activation!r} must be 'relu' or "
                       "'tanh'")
    activation = nn.relu if self.activation == 'relu' else jnp.tanh
    if resolve_layout(self.layout, self.conv_implementation) == 'nhwc':
      hidden = activation(conv(6, 5, images, self.conv_implementation,
                               self.dtype, 'conv1'))
      hidden = pool_2x2(hidden, self.pooling)
      hidden = activation(conv(16, 5, hidden, self.conv_implementation,
                               self.dtype, 'conv2', padding='VALID'))
      hidden = pool_2x2(hidden, self.pooling)
    else:
      hidden = jnp.transpose(images, (3, 1, 2, 0))
      hidden = activation(BatchMinorConv(6, 5, dtype=self.dtype,
                                         name='conv1')(hidden))
      hidden = pool_2x2(hidden, self.pooling)
      hidden = activation(BatchMinorConv(16, 5, padding='VALID',
                                         dtype=self.dtype,
                                         name='conv2')(hidden))
      hidden = pool_2x2(hidden, self.pooling)
      # Back to NHWC before flattening: fc1's rows keep one order.
      hidden = jnp.transpose(hidden, (3, 1, 2, 0))
    hidden = hidden.reshape(hidden.shape[0], -1)
    hidden = activation(nn.Dense(120, dtype=self.dtype, name='fc1')(hidden))
    hidden = activation(nn.Dense(84, dtype=self.dtype, name='fc2')(hidden))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(hidden)
    return ClassifierOutput(logits.astype(jnp.float32))


def parameter_count(model: nn.Module, image_shape: Sequence[int]) -> int:
  """Number of parameters of `model` on `image_shape` inputs (no compute)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *image_shape), jnp.float32))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


if __name__ == '__main__':
  for image_shape in ((28, 28, 1), (36, 36, 1), (40, 40, 1)):
    for model in (BaselineCNN(), LeNet5()):
      print(f'{type(model).__name__} on {image_shape}: '
            f'{parameter_count(model, image_shape):,} parameters')
