"""Florence on florence_kernels: models (CoSwin, text tower, two-tower Florence), tokenizer, evaluation."""

from .models import CoSwin, Florence, TextTransformer, create_coswin, create_model, list_models
from .tokenizer import Tokenizer, get_tokenizer, tokenize

__all__ = ["CoSwin", "Florence", "TextTransformer", "Tokenizer", "create_coswin", "create_model", "get_tokenizer",
           "list_models", "tokenize"]  # fmt: skip
