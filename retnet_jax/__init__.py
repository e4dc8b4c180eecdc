"""retnet_jax: RetNet (Sun et al. 2023) in JAX and Flax NNX."""

from retnet_jax.config import PRESETS, RetNetConfig
from retnet_jax.layers.block import RetNetBlock
from retnet_jax.layers.feedforward import FeedForward
from retnet_jax.layers.retention import MultiScaleRetention
from retnet_jax.model import RetNet
from retnet_jax.ops import RetentionState
from retnet_jax.sampling import generate, stream

__version__ = "0.1.0"
__all__ = ["PRESETS", "FeedForward", "MultiScaleRetention", "RetNet", "RetNetBlock", "RetNetConfig",
           "RetentionState", "generate", "stream"]
