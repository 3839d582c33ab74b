"""Florence on florence_kernels: models (CoSwin, text tower, two-tower Florence), tokenizer, evaluation, data.

Names are imported on first use, so ``florence.data`` tools (and their worker processes) do not load torch unless
they need it.
"""

import importlib

_EXPORTS = {
    "CoSwin": "florence.models",
    "Florence": "florence.models",
    "TextTransformer": "florence.models",
    "create_coswin": "florence.models",
    "create_model": "florence.models",
    "list_models": "florence.models",
    "Tokenizer": "florence.tokenizer",
    "get_tokenizer": "florence.tokenizer",
    "tokenize": "florence.tokenizer",
    "random_token_ids": "florence.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("models", "data", "eval", "tokenizer"):
        return importlib.import_module(f"florence.{name}")
    raise AttributeError(f"module 'florence' has no attribute {name!r}")
