"""Text in, text out: a tokenizer (`retnet_jax.data`, byte-level by default) around `generate`/`stream`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from retnet_jax.data.tokenizers import Tokenizer
from retnet_jax.sampling.sampler import generate, stream

_TOKENIZER_EOS = object()  # eos_id's default: the tokenizer's end-of-document id


def encode_prompt(tokenizer: Tokenizer, prompt: str, vocab_size: int) -> list[int]:
    """`prompt`'s ids, refusing (ValueError naming `prompt`) empty text and ids the model lacks."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be non-empty text, got {prompt!r}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens with {tokenizer!r}")
    if max(ids) >= vocab_size:
        raise ValueError(f"prompt: {tokenizer!r} gives ids up to {max(ids)}, outside the model's "
                         f"vocabulary [0, {vocab_size}): the tokenizer does not match the model")
    return ids


def stream_text(model, tokenizer: Tokenizer, prompt: str, *, eos_id=_TOKENIZER_EOS,
                **settings) -> Iterator[str]:
    """The continuation of `prompt` as it is generated, in pieces of text (see `stream`; `settings`
    are its keyword arguments). Generation stops at the tokenizer's end-of-document id unless
    `eos_id` says otherwise (None: never)."""
    ids = encode_prompt(tokenizer, prompt, model.cfg.vocab_size)
    eos_id = _default_eos(tokenizer, model, eos_id)
    pieces = stream(model, [ids], eos_id=eos_id, **settings)
    return _text_increments(tokenizer, (piece for (piece,) in pieces))


def generate_text(model, tokenizer: Tokenizer, prompts: str | list[str], *, eos_id=_TOKENIZER_EOS,
                  **settings) -> list[str]:
    """Each prompt's continuation as text (`generate` on the encoded prompts; `settings` are its
    keyword arguments, `max_new_tokens` among them)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    ids = [encode_prompt(tokenizer, p, model.cfg.vocab_size) for p in prompts]
    out = generate(model, ids, eos_id=_default_eos(tokenizer, model, eos_id), **settings)
    tokens_bn, counts_b = np.asarray(out.tokens_bn), np.asarray(out.counts_b)
    return [tokenizer.decode(row[:n]) for row, n in zip(tokens_bn, counts_b)]


def _default_eos(tokenizer: Tokenizer, model, eos_id):
    if eos_id is not _TOKENIZER_EOS:
        return eos_id
    return tokenizer.eod_id if tokenizer.eod_id < model.cfg.vocab_size else None


def _text_increments(tokenizer: Tokenizer, pieces: Iterable[np.ndarray]) -> Iterator[str]:
    """The text that each piece of ids adds. A trailing U+FFFD is held back until the next piece:
    it may be a character whose bytes are split between pieces."""
    ids: list[int] = []
    shown = 0
    for piece in pieces:
        ids.extend(int(i) for i in piece)
        text = tokenizer.decode(ids).rstrip("\ufffd")
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(ids)
    if len(text) > shown:
        yield text[shown:]
