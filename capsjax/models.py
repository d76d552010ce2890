"""The paper's CapsNet (Sabour, Frosst & Hinton 2017, Fig. 1 and 2)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from capsjax.layers import CapsuleLayer, Conv2D, MaskedDecoder, PrimaryCapsules
from capsjax.nonlinearity import capsule_lengths


class CapsNetOutput(NamedTuple):
  """What `CapsNet` returns; a pytree.

  capsules: class capsules v, `(batch, classes, dim)`.
  lengths: |v|, `(batch, classes)`, the class probabilities.
  reconstructions: `(batch, *image_shape)` (or `(batch, k, *image_shape)`
    for labels `(batch, k)`), None without a decoder.
  """

  capsules: jax.Array
  lengths: jax.Array
  reconstructions: jax.Array | None


class CapsNet(nn.Module):
  """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> masked decoder.

  On 28x28x1 inputs and 10 classes it has 8,215,568 parameters (6,804,224
  without the decoder), as in the paper. The input size is read from the
  images at `init`, so 36x36 (MultiMNIST) or 40x40 (affNIST) work unchanged.
  """

  num_classes: int = 10
  routing_iterations: int = 3
  use_decoder: bool = True
  conv_features: int = 256
  kernel_size: int = 9
  primary_capsule_types: int = 32
  primary_capsule_dim: int = 8
  primary_capsule_scale: float = 1.0
  class_capsule_dim: int = 16
  decoder_hidden_sizes: Sequence[int] = (512, 1024)
  stop_gradient_intermediate: bool = False
  # Compute dtype of the matmuls (convolutions, prediction vectors, decoder).
  dtype: Any = jnp.float32
  # How both convolutions are computed (`capsjax.convolution.conv2d`):
  # 'auto' (Fourier for float32 on CPU, else patches), 'patches' or
  # 'fourier'.
  conv_method: str = 'auto'

  @nn.compact
  def __call__(
      self, images: jax.Array, labels: jax.Array | None = None
  ) -> CapsNetOutput:
    """Classify and reconstruct.

    Args:
      images: `(batch, height, width, channels)`, pixels in [0, 1].
      labels: the classes to decode, `(batch,)` or `(batch, k)`, in
        training; None decodes the longest capsule.

    Returns:
      A `CapsNetOutput`.
    """
    if images.ndim != 4:
      raise ValueError(
          f'images must be (batch, height, width, channels), got {images.shape}'
      )
    features = nn.relu(
        Conv2D(
            self.conv_features,
            self.kernel_size,
            dtype=self.dtype,
            method=self.conv_method,
            name='conv1',
        )(images)
    )
    primary = PrimaryCapsules(
        self.primary_capsule_types,
        self.primary_capsule_dim,
        self.kernel_size,
        stride=2,
        output_scale=self.primary_capsule_scale,
        dtype=self.dtype,
        conv_method=self.conv_method,
        name='primary_capsules',
    )(features)
    capsules = CapsuleLayer(
        self.num_classes,
        self.class_capsule_dim,
        self.routing_iterations,
        self.stop_gradient_intermediate,
        dtype=self.dtype,
        name='class_capsules',
    )(primary)
    reconstructions = None
    if self.use_decoder:
      reconstructions = MaskedDecoder(
          images.shape[1:],
          self.decoder_hidden_sizes,
          dtype=self.dtype,
          name='decoder',
      )(capsules, labels)
    return CapsNetOutput(capsules, capsule_lengths(capsules), reconstructions)
