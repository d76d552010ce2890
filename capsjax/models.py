"""Capsule networks: the paper's CapsNet (Sabour, Frosst & Hinton 2017, Fig. 1
and 2) with any routing, and Efficient-CapsNet (Mazzia et al. 2021)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from capsjax import routing
from capsjax.layers import CapsuleLayer, Conv2D, MaskedDecoder, PrimaryCapsules
from capsjax.nonlinearity import capsule_lengths


class CapsNetOutput(NamedTuple):
  """What `CapsNet` returns; a pytree.

  capsules: class capsules v, `(batch, classes, dim)` (EM: the pose means).
  lengths: `(batch, classes)`, the class probabilities: |v| (EM: the
    activations a_j).
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

  >>> import math, jax, jax.numpy as jnp
  >>> def count(variables):
  ...   return sum(math.prod(p.shape) for p in jax.tree.leaves(variables))
  >>> key, mnist = jax.random.key(0), jnp.zeros((1, 28, 28, 1))
  >>> count(jax.eval_shape(CapsNet().init, key, mnist))
  8215568
  >>> count(jax.eval_shape(CapsNet(use_decoder=False).init, key, mnist))
  6804224
  >>> model, multimnist = CapsNet(), jnp.zeros((2, 36, 36, 1))
  >>> variables = jax.eval_shape(model.init, key, multimnist)
  >>> two_digits = jnp.array([[3, 5], [7, 1]])
  >>> out = jax.eval_shape(model.apply, variables, multimnist, two_digits)
  >>> out.capsules.shape, out.lengths.shape, out.reconstructions.shape
  ((2, 10, 16), (2, 10), (2, 2, 36, 36, 1))
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
  # 'auto' (`capsjax.convolution.resolve_method`: on the CPU Fourier where
  # it pays, else patches; 'lax' off the CPU), 'patches', 'fourier' or 'lax'.
  conv_method: str = 'auto'
  # The class capsules' routing (`capsjax.routing.ALGORITHMS`): 'dynamic'
  # (the paper), 'em' (the 16D votes as flattened 4x4 poses, the primary
  # capsules' lengths as their activations; + beta_u, beta_a, 20 parameters),
  # 'self_attention' (+ log priors, 11,520 parameters) or 'none'.
  routing: str = 'dynamic'
  # The official code's parameters where the paper is silent: every kernel
  # drawn from a normal truncated at two standard deviations (0.05 for
  # conv1, 0.1 for the others), every bias started at 0.1, and a bias on
  # each class capsule's s[j] at every routing iteration ('dynamic' only;
  # 160 more parameters). With primary_capsule_scale=1/32 this is the
  # official network. False: flax's defaults (LeCun normal kernels, zero
  # biases), W ~ N(0, 0.01^2), no class capsule bias.
  official_layers: bool = False

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
    conv1_init, primary_init, class_init, decoder_init = (
        _official_initializers() if self.official_layers else ({},) * 4)
    features = nn.relu(
        Conv2D(
            self.conv_features,
            self.kernel_size,
            dtype=self.dtype,
            method=self.conv_method,
            name='conv1',
            **conv1_init,
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
        **primary_init,
    )(features)
    # EM routing needs each primary capsule's presence: its length.
    primary_activations = (
        capsule_lengths(primary) if self.routing == 'em' else None)
    routed = CapsuleLayer(
        self.num_classes,
        self.class_capsule_dim,
        self.routing_iterations,
        self.stop_gradient_intermediate,
        dtype=self.dtype,
        routing=self.routing,
        name='class_capsules',
        **class_init,
    )(primary, primary_activations)
    reconstructions = None
    if self.use_decoder:
      if labels is None:  # The most probable class: the longest for vectors.
        labels = jnp.argmax(routed.activations, axis=-1)
      reconstructions = MaskedDecoder(
          images.shape[1:],
          self.decoder_hidden_sizes,
          dtype=self.dtype,
          name='decoder',
          **decoder_init,
      )(routed.poses, labels)
    return CapsNetOutput(routed.poses, routed.activations, reconstructions)


def _official_initializers() -> tuple[dict[str, Any], ...]:
  """Keyword arguments of conv1, PrimaryCapsules, CapsuleLayer and
  MaskedDecoder for `CapsNet.official_layers`: TensorFlow's
  truncated_normal_initializer (cut at 2 standard deviations, the standard
  deviation named being the uncut one's, as in JAX's) and biases of 0.1."""
  bias = nn.initializers.constant(0.1)
  kernel = nn.initializers.truncated_normal(stddev=0.1)
  return (
      {'kernel_init': nn.initializers.truncated_normal(stddev=0.05),
       'bias_init': bias},
      {'kernel_init': kernel, 'bias_init': bias},
      {'weight_init': kernel, 'use_bias': True, 'bias_init': bias},
      {'kernel_init': kernel, 'bias_init': bias},
  )


class EfficientCapsNet(nn.Module):
  """Efficient-CapsNet's MNIST network (Mazzia, Salvetti & Chiaberge 2021).

  Four VALID convolutions with ReLU and batch norm (5x5 1->32, 3x3 32->64,
  3x3 64->64, 3x3 stride 2 64->128), depthwise 9x9 primary capsules (16 of
  8D, `routing.exponential_squash`), then 10 class capsules of 16D by
  self-attention routing (`CapsuleLayer(routing='self_attention')`): 161,824
  trainable parameters on 28x28x1 inputs ('params'; the batch norms' moving
  statistics are in 'batch_stats'), plus 1,411,344 for the optional decoder,
  which the paper does not count. Call with `train=True` and
  `mutable=['batch_stats']` in training.

  >>> import math, jax, jax.numpy as jnp
  >>> def count(variables):
  ...   return sum(math.prod(p.shape) for p in jax.tree.leaves(variables))
  >>> model, images = EfficientCapsNet(), jnp.zeros((2, 28, 28, 1))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)
  >>> count(variables['params']) - count(variables['params']['decoder'])
  161824
  >>> count(variables['params']['decoder']), count(variables['batch_stats'])
  (1411344, 576)
  >>> out, updates = jax.eval_shape(
  ...     lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
  ...     variables, images)
  >>> out.lengths.shape, list(updates)
  ((2, 10), ['batch_stats'])
  """

  num_classes: int = 10
  use_decoder: bool = True
  decoder_hidden_sizes: Sequence[int] = (512, 1024)
  dtype: Any = jnp.float32
  conv_method: str = 'auto'  # `Conv2D.method`

  @nn.compact
  def __call__(
      self, images: jax.Array, labels: jax.Array | None = None, *,
      train: bool = False
  ) -> CapsNetOutput:
    """images `(batch, 28, 28, 1)`, labels as `CapsNet` -> `CapsNetOutput`."""
    features = images
    for features_out, kernel_size, stride in (
        (32, 5, 1), (64, 3, 1), (64, 3, 1), (128, 3, 2)):
      features = nn.relu(Conv2D(
          features_out, kernel_size, stride, dtype=self.dtype,
          method=self.conv_method,
          kernel_init=nn.initializers.he_normal())(features))
      # Keras' defaults, as the official code.
      features = nn.BatchNorm(use_running_average=not train, momentum=0.99,
                              epsilon=1e-3)(features)
    # Depthwise: one 9x9 filter per channel over the whole 9x9 map.
    maps = nn.Conv(features.shape[-1], features.shape[1:3], padding='VALID',
                   feature_group_count=features.shape[-1], dtype=self.dtype,
                   name='primary_capsules')(features)
    primary = routing.exponential_squash(
        maps.astype(jnp.float32).reshape(images.shape[0], 16, 8))
    routed = CapsuleLayer(
        self.num_classes, 16, dtype=self.dtype, routing='self_attention',
        weight_init=nn.initializers.he_normal(), name='class_capsules',
    )(primary)
    reconstructions = None
    if self.use_decoder:
      if labels is None:
        labels = jnp.argmax(routed.activations, axis=-1)
      reconstructions = MaskedDecoder(
          images.shape[1:], self.decoder_hidden_sizes, dtype=self.dtype,
          name='decoder')(routed.poses, labels)
    return CapsNetOutput(routed.poses, routed.activations, reconstructions)
