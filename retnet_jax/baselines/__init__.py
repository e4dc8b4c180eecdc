"""Baselines the paper compares RetNet with: a Transformer of the same size and call contract."""

from retnet_jax.baselines.block import TransformerBlock
from retnet_jax.baselines.config import TransformerConfig
from retnet_jax.baselines.kv_cache import KVCache
from retnet_jax.baselines.transformer import Transformer

__all__ = ["KVCache", "Transformer", "TransformerBlock", "TransformerConfig"]
