"""Generation: ragged prompts, greedy / temperature / top-k / top-p sampling, stop tokens, streaming.

`generate` and `stream` (sampler.py) drive a prefill and blocks of compiled decode steps (decode.py);
filters.py chooses tokens from logits; prompts.py lays out prompts of different lengths; states.py
holds what decoding needs of a model's state; text.py puts a tokenizer around it all.
"""

from retnet_jax.sampling.filters import Sampling, check_sampling, choose_tokens, filtered_logits
from retnet_jax.sampling.sampler import Generation, generate, stream

__all__ = ["Generation", "Sampling", "check_sampling", "choose_tokens", "filtered_logits", "generate",
           "stream"]
