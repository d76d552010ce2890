"""The per-example loss and accuracy of every model on every dataset.

CapsNet: margin loss on the capsule lengths (eq. 4; multi-hot targets for
two-label examples) plus `config.reconstruction_weight` times the sum of
squared errors of each labelled digit's reconstruction (MultiMNIST: digit k
from capsule labels[:, k] against that digit alone). Classifiers (the
baselines): softmax cross entropy, or a sigmoid per class for two labels.
Accuracy: the longest capsule (highest logit) is the label; for two labels,
the two longest are the two labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from capsjax import losses
from capsjax import metrics
from train import baselines
from train import datasets


def per_example_losses(output, batch: dict[str, jax.Array],
                       config: ml_collections.ConfigDict
                       ) -> dict[str, jax.Array]:
  """'loss' and the metrics of each example, each `(batch,)`.

  `batch['label']` is `(batch,)`, or `(batch, 2)` for two-label examples
  (with their `digits` `(batch, 2, H, W, C)`, each digit alone).
  """
  labels = batch['label']
  two_labels = labels.ndim == 2
  targets = metrics.multi_hot(labels, datasets.NUM_CLASSES)
  if isinstance(output, baselines.ClassifierOutput):
    logits = output.logits
    if two_labels:  # Each class present or not: a sigmoid per class.
      cross_entropy = jnp.sum(
          optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
    else:
      cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels)
    return {'loss': cross_entropy, 'cross_entropy': cross_entropy,
            'accuracy': _accuracy(logits, labels)}
  margin = losses.margin_loss(
      output.lengths, targets,
      margin_positive=config.margin_positive,
      margin_negative=config.margin_negative,
      absent_class_weight=config.absent_class_weight)
  if output.reconstructions is None:
    reconstruction = jnp.zeros_like(margin)
  else:
    # One reconstruction per label: (batch, labels, H, W, C).
    if two_labels:
      reconstructions, originals = output.reconstructions, batch['digits']
    else:
      reconstructions = output.reconstructions[:, None]
      originals = batch['image'][:, None]
    reconstruction = sum(
        losses.reconstruction_loss(reconstructions[:, k], originals[:, k],
                                   weight=config.reconstruction_weight)
        for k in range(originals.shape[1]))
  result = {
      'loss': margin + reconstruction,
      'margin_loss': margin,
      'reconstruction_loss': reconstruction,
      'accuracy': _accuracy(output.lengths, labels),
  }
  if two_labels:
    result['per_digit_accuracy'] = metrics.per_label_accuracy(output.lengths,
                                                              labels)
  return result


def _accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
  if labels.ndim == 2:
    return metrics.multi_label_accuracy(scores, labels)
  return metrics.accuracy(scores, labels)
