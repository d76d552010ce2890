"""The runnable examples in the docstrings of capsjax's public functions."""

import doctest

import pytest

from capsjax import convolution
from capsjax import layers
from capsjax import losses
from capsjax import matrix_capsules
from capsjax import metrics
from capsjax import models
from capsjax import nonlinearity
from capsjax import routing


@pytest.mark.parametrize('module', [nonlinearity, routing, losses, convolution,
                                    layers, models, metrics,
                                    matrix_capsules],
                         ids=lambda module: module.__name__)
def test_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f'{module.__name__} has no examples'
  assert result.failed == 0
