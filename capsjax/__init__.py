"""capsjax: Capsule Networks in JAX: dynamic routing (Sabour et al. 2017), EM,
self-attention and no routing behind one interface (`capsjax.routing`),
and matrix capsules with EM routing (`capsjax.matrix_capsules`).

Pure functions hold the maths (`squash`, `capsjax.routing`, `capsjax.losses`,
`capsjax.convolution`); thin Flax linen modules wrap them (`CapsNet` and its
layers, `MatrixCapsNet`).
"""

from capsjax import convolution
from capsjax import losses
from capsjax import matrix_capsules
from capsjax import metrics
from capsjax import routing
from capsjax.layers import CapsuleLayer
from capsjax.layers import Conv2D
from capsjax.layers import MaskedDecoder
from capsjax.layers import PrimaryCapsules
from capsjax.layers import mask_capsules
from capsjax.matrix_capsules import MatrixCapsNet
from capsjax.models import CapsNet
from capsjax.models import CapsNetOutput
from capsjax.models import EfficientCapsNet
from capsjax.nonlinearity import capsule_lengths
from capsjax.nonlinearity import safe_norm
from capsjax.nonlinearity import squash
from capsjax.routing import dynamic_routing
from capsjax.routing import prediction_vectors

__version__ = '0.1.0'

__all__ = [
    'CapsNet',
    'CapsNetOutput',
    'CapsuleLayer',
    'EfficientCapsNet',
    'Conv2D',
    'MaskedDecoder',
    'MatrixCapsNet',
    'PrimaryCapsules',
    'capsule_lengths',
    'convolution',
    'dynamic_routing',
    'losses',
    'mask_capsules',
    'matrix_capsules',
    'metrics',
    'prediction_vectors',
    'routing',
    'safe_norm',
    'squash',
]
