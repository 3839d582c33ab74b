"""CLIP's BPE tokenizer, with the vocabulary open_clip ships inside its package (nothing is downloaded).

``tokenize(texts)`` -> (N, 77) int64: start-of-text, the BPE ids, end-of-text (truncated to the context, the last
position kept for end-of-text), zero padding. The end-of-text id (49407) is the largest in the vocabulary, so a
text transformer pools at ``tokens.argmax(-1)``.

``get_tokenizer(name)`` gives the tokenizer of a registered model config (open_clip's ``get_tokenizer(model_name)``):
its context length is the config's text context, so ``model.encode_text(get_tokenizer(name)(texts))`` runs for
the model ``create_model(name)`` builds; ``get_tokenizer(context_length=16)`` (or ``get_tokenizer(16)``) gives one
for a context length.
"""

from __future__ import annotations

import functools

import torch

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408


class Tokenizer:
    """Callable: a string or a list of strings -> (N, context_length) int64 token ids.

    Needs open_clip (``florence.optional``: why we use its tokenizer); without it raises
    ``florence.optional.MissingOptionalDependency`` (an ImportError) naming the install command.
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        from florence.optional import require

        if not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length: expected an int >= 3, got {context_length!r}")
        SimpleTokenizer = require("open_clip", "florence.Tokenizer").tokenizer.SimpleTokenizer
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
def _tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)


def model_context_length(name: str) -> int:
    """The text context length of the registered model config ``name`` (ValueError naming the known configs)."""
    import inspect

    from florence.models import get_config, list_models

    known = list_models()
    if name not in known:
        raise ValueError(f"name: {name!r} is not a registered model config; known: {', '.join(known)}")
    text = get_config(name).get("text")
    if not isinstance(text, dict):
        raise ValueError(f"name: model config {name!r} has no text tower")
    if "context_length" in text:
        return text["context_length"]
    from florence.models import TextTransformer

    return inspect.signature(TextTransformer).parameters["context_length"].default


def get_tokenizer(name: str | int | None = None, context_length: int | None = None) -> Tokenizer:
    """The tokenizer of the model config ``name`` (its text context length), or of ``context_length`` (default 77).

    ``name`` may also be an int, read as the context length (``get_tokenizer(16)``). With both, ``context_length``
    must not exceed the model's context (a shorter one is valid: the text tower takes up to its context).
    Tokenizers are cached: the same object for the same context length.
    """
    if isinstance(name, int) and not isinstance(name, bool):
        if context_length is not None:
            raise ValueError(f"context_length: given twice ({name} positionally and {context_length} by name)")
        name, context_length = None, name
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"name: expected a model config name (str) or a context length (int), got {name!r}")
        model_context = model_context_length(name)
        if context_length is None:
            context_length = model_context
        elif isinstance(context_length, int) and context_length > model_context:
            raise ValueError(f"context_length: {context_length} exceeds the text context {model_context} of {name!r}")
    if context_length is None:
        context_length = CONTEXT_LENGTH
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 3:
        raise ValueError(f"context_length: expected an int >= 3, got {context_length!r}")
    return _tokenizer(context_length)


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """(N, context_length) token ids of ``texts``; for a model's context use ``get_tokenizer(model_name)(texts)``."""
    return get_tokenizer(context_length=context_length)(texts)


def random_token_ids(n: int, context_length: int = CONTEXT_LENGTH, length: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, context_length) int64 ids laid out as the tokenizer lays them out: start-of-text (49406), ``length``
    ids drawn from the BPE range [256, 49000), end-of-text (49407), zero padding. For benchmarks and tests that need
    token ids but not a text's (a text tower's cost and shapes do not depend on which ids); needs no open_clip.
    ValueError naming ``n``, ``context_length`` or ``length`` when one is not a valid int, or ``length + 2`` exceeds
    ``context_length``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 3:
        raise ValueError(f"context_length: expected an int >= 3, got {context_length!r}")
    if not isinstance(length, int) or length < 0 or length + 2 > context_length:
        raise ValueError(f"length: {length!r} ids + start + end must fit context_length {context_length}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, context_length, dtype=torch.long)
    ids[:, 0], ids[:, length + 1] = 49406, 49407
    ids[:, 1 : length + 1] = torch.randint(256, 49000, (n, length), generator=g)
    return ids
