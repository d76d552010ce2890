"""CapsNet losses (Sabour, Frosst & Hinton 2017, sections 3 and 4.1).

Both return one value per example (no reduction), as optax losses do; the
training loss is their mean over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The paper's constants.
MARGIN_POSITIVE = 0.9
MARGIN_NEGATIVE = 0.1
ABSENT_CLASS_WEIGHT = 0.5
RECONSTRUCTION_WEIGHT = 0.0005


def margin_loss(
    capsule_lengths: jax.Array,
    targets: jax.Array,
    margin_positive: float = MARGIN_POSITIVE,
    margin_negative: float = MARGIN_NEGATIVE,
    absent_class_weight: float = ABSENT_CLASS_WEIGHT,
) -> jax.Array:
  """Margin loss, eq. 4, summed over classes.

      L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

  The lengths go in as they are: no softmax over classes (a pitfall of some
  ports), since each length is its own probability.

  >>> import jax.numpy as jnp
  >>> lengths = jnp.array([[0.95, 0.05], [0.5, 0.5]])
  >>> targets = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  >>> [round(float(x), 4) for x in margin_loss(lengths, targets)]
  [0.0, 0.24]

  Args:
    capsule_lengths: |v_k|, `(batch, classes)`.
    targets: T_k, `(batch, classes)`, 1 where class k is present: one-hot for
      MNIST, two ones for MultiMNIST.
    margin_positive: m+, the length a present class must reach.
    margin_negative: m-, the length an absent class must stay under.
    absent_class_weight: lambda, down-weights the absent classes' term.

  Returns:
    `(batch,)` sum over classes of L_k.
  """
  targets = targets.astype(capsule_lengths.dtype)
  present = targets * jnp.square(jax.nn.relu(margin_positive - capsule_lengths))
  absent = (
      absent_class_weight
      * (1.0 - targets)
      * jnp.square(jax.nn.relu(capsule_lengths - margin_negative))
  )
  return jnp.sum(present + absent, axis=-1)


def reconstruction_loss(
    reconstructions: jax.Array,
    images: jax.Array,
    weight: float = RECONSTRUCTION_WEIGHT,
) -> jax.Array:
  """Weighted sum of squared pixel differences per example (section 4.1).

      L_rec = weight * sum_pixels (reconstruction - image)^2

  >>> import jax.numpy as jnp
  >>> float(reconstruction_loss(jnp.ones((1, 28, 28, 1)),
  ...                           jnp.zeros((1, 28, 28, 1)), weight=1.0)[0])
  784.0

  Args:
    reconstructions: `(batch, ...)` decoder output, pixels in [0, 1].
    images: `(batch, ...)` targets of the same shape, pixels in [0, 1].
    weight: 0.0005 in the paper, so the margin loss dominates.

  Returns:
    `(batch,)` weighted sums.
  """
  if reconstructions.shape != images.shape:
    raise ValueError(
        f'reconstructions {reconstructions.shape} and images {images.shape} '
        'must have the same shape'
    )
  squared_error = jnp.square(
      reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
  )
  return weight * jnp.sum(squared_error.reshape(images.shape[0], -1), axis=-1)
