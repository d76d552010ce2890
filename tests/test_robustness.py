"""Rotations, affine warps and the affine test set of train/robustness.py."""

import json

import numpy as np
import pytest

from train import robustness
from train import transforms


def _random_images(num=3, size=28, seed=0):
  return np.random.default_rng(seed).uniform(
      size=(num, size, size, 1)).astype(np.float32)


def test_rotation_by_zero_is_exactly_the_identity():
  images = _random_images()
  np.testing.assert_array_equal(transforms.rotate(images, 0.0), images)
  np.testing.assert_array_equal(transforms.rotate(images, np.zeros(3)),
                                images)
  # Also on an odd size (integer centre) and a non-square image.
  odd = _random_images(2, 27)
  np.testing.assert_array_equal(transforms.rotate(odd, 0), odd)
  wide = np.random.default_rng(1).uniform(size=(1, 5, 8, 2)).astype(
      np.float32)
  np.testing.assert_array_equal(transforms.rotate(wide, 0), wide)


def test_rotation_by_90_of_a_known_pattern():
  # A bar from the centre upwards; counter-clockwise it points left.
  image = np.zeros((1, 7, 7, 1), np.float32)
  image[0, 0:4, 3] = 1.0
  expected = np.zeros_like(image)
  expected[0, 3, 0:4] = 1.0
  np.testing.assert_allclose(transforms.rotate(image, 90), expected,
                             atol=1e-6)
  np.testing.assert_allclose(transforms.rotate(image, -90)[0, 3, 3:7, 0],
                             np.ones(4), atol=1e-6)
  np.testing.assert_allclose(transforms.rotate(image, 180)[0, 3:7, 3, 0],
                             np.ones(4), atol=1e-6)
  # Four quarter turns come back (even size: centre between pixels).
  images = _random_images(2, 8)
  turned = images
  for _ in range(4):
    turned = transforms.rotate(turned, 90)
  np.testing.assert_allclose(turned, images, atol=1e-5)


def test_rotation_is_bilinear_with_zero_fill():
  image = np.ones((1, 9, 9, 1), np.float32)
  rotated = transforms.rotate(image, 45)
  assert rotated.shape == image.shape and rotated.dtype == np.float32
  assert rotated[0, 4, 4, 0] == pytest.approx(1.0)
  assert rotated[0, 0, 0, 0] == 0.0  # corner comes from outside: zero fill
  assert 0 < rotated[0, 0, 1, 0] < 1  # partly outside: interpolated
  # Per-image angles.
  both = transforms.rotate(np.concatenate([image, image]), np.array([0, 45]))
  np.testing.assert_array_equal(both[0], image[0])
  np.testing.assert_allclose(both[1], rotated[0])


def test_affine_warp_translation_and_output_size():
  image = np.zeros((1, 5, 5, 1), np.float32)
  image[0, 2, 2] = 1.0
  moved = transforms.affine_warp(image, np.eye(2), np.array([1.0, -2.0]))
  assert moved[0, 3, 0, 0] == 1.0 and moved.sum() == 1.0
  bigger = transforms.affine_warp(image, np.eye(2), None, output_size=9)
  assert bigger.shape == (1, 9, 9, 1) and bigger[0, 4, 4, 0] == 1.0
  np.testing.assert_array_equal(transforms.center_on_canvas(image, 9), bigger)


def test_affine_parameters_stay_in_their_ranges():
  ranges = transforms.AffineRanges()
  parameters = transforms.sample_affine(np.random.default_rng(0), 2000,
                                        ranges)
  assert np.abs(parameters['rotation_degrees']).max() <= 20
  assert np.abs(parameters['rotation_degrees']).max() > 19
  assert np.abs(parameters['shear']).max() <= 0.2
  assert parameters['scale'].min() >= 0.8 and parameters['scale'].max() <= 1.2
  matrices = transforms.affine_matrices(parameters)
  determinants = np.linalg.det(matrices)
  np.testing.assert_allclose(determinants, parameters['scale'].prod(-1))


def test_affine_test_set_keeps_digits_on_the_canvas():
  images = np.zeros((200, 28, 28, 1), np.float32)
  images[:, 4:24, 10:18] = 1.0  # a 20x8 'digit'
  labels = np.arange(200) % 10
  warped, same_labels, parameters = transforms.affine_test_set(
      images, labels, seed=0)
  assert warped.shape == (200, 40, 40, 1) and warped.dtype == np.float32
  assert same_labels is labels
  # No ink lost to the canvas edges: ink scales with the determinant.
  ink = warped.sum(axis=(1, 2, 3))
  expected = images.sum(axis=(1, 2, 3)) * np.abs(
      np.linalg.det(parameters['matrix']))
  np.testing.assert_allclose(ink, expected, rtol=0.02)
  # The digits really move around the canvas.
  boxes = transforms.bounding_boxes(warped)
  assert boxes[:, 0].min() <= 2 and boxes[:, 1].max() >= 38
  # Deterministic for a seed.
  again, _, _ = transforms.affine_test_set(images[:5], labels[:5], seed=0)
  np.testing.assert_array_equal(again, warped[:5])


def test_affine_test_set_without_transformations_is_centring():
  images = _random_images(4)
  none = transforms.AffineRanges(max_rotation_degrees=0, max_shear=0,
                                 min_scale=1, max_scale=1, translate=False)
  warped, _, _ = transforms.affine_test_set(images, np.arange(4), ranges=none)
  np.testing.assert_array_equal(warped, transforms.center_on_canvas(images,
                                                                    40))


def test_sweep_table_json_and_plot(tmp_path):
  images = np.zeros((4, 8, 8, 1), np.float32)
  images[:, 0:4, 3:5] = 1.0  # upright bar: class 0; otherwise class 1
  labels = np.zeros(4, np.int64)

  def predict(batch):
    return (batch[:, 0:3, 3:5].sum(axis=(1, 2, 3)) < 3).astype(np.int64)

  angles = robustness._parse_angles('-90:90:45')
  assert angles == [-90, -45, 0, 45, 90]
  assert 35 in robustness._parse_angles('-60:60:5')
  assert -35 in robustness.DEFAULT_ANGLES
  result = robustness.accuracy_sweep(predict, images, labels, angles,
                                     images, labels)
  assert result['accuracy'] == [0.0, 0.0, 1.0, 0.0, 0.0]
  assert result['affine_accuracy'] == 1.0
  results = {'a': result, 'b': result}
  table = robustness.format_table(results)
  assert 'affine' in table and '100.00%' in table
  robustness.plot(results, tmp_path / 'r.png')
  assert (tmp_path / 'r.png').stat().st_size > 1000
  json.dumps(results)
