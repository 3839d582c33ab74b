"""CLIP's BPE tokenizer, with the vocabulary open_clip ships inside its package (nothing is downloaded).

``tokenize(texts)`` -> (N, 77) int64: start-of-text, the BPE ids, end-of-text (truncated to the context, the last
position kept for end-of-text), zero padding. The end-of-text id (49407) is the largest in the vocabulary, so a
text transformer pools at ``tokens.argmax(-1)``.
"""

from __future__ import annotations

import functools

import torch

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408


class Tokenizer:
    """Callable: a string or a list of strings -> (N, context_length) int64 token ids."""

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        from open_clip.tokenizer import SimpleTokenizer

        if not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length: expected an int >= 3, got {context_length!r}")
        self._tok = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = self._tok.vocab_size
        self.sot_token_id, self.eot_token_id = self._tok.sot_token_id, self._tok.eot_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts: expected a string or a list of strings, got {type(texts).__name__}")
        return self._tok(list(texts), context_length=self.context_length)

    def encode(self, text: str) -> list[int]:
        """The BPE ids of one text, without start/end tokens or truncation (for counting tokens)."""
        return self._tok.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (0, self.sot_token_id, self.eot_token_id)]
        return self._tok.decode(ids).strip()


@functools.cache
def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    return Tokenizer(context_length)


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    return get_tokenizer(context_length)(texts)
