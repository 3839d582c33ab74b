"""RoBERTa as METER's text stream, the option the paper takes (METER, Dou et al. 2022, section 4: "RoBERTa-base" as
the text encoder of its best VQA model), through Hugging Face transformers, from a folder on this machine only.

    stream, tokens = load_roberta("/models/roberta-base", max_length=40)   # config.json, weights, tokenizer files
    model = METER(vision, {"roberta": stream.config}, num_answers); model.text.load_state_dict(stream.state_dict())

- :class:`RobertaStream` (an ``nn.Module``): ``transformers.RobertaModel`` without its pooler (METER pools its own
  way), built from a config dict (so that a saved METER rebuilds it without the folder); ``forward_tokens(tokens (B,
  L) int64, mask (B, L) bool)`` -> every token's last hidden state (B, L, hidden) float; ``width`` (hidden size),
  ``pad_token_id``, ``config`` (the RobertaConfig as a JSON-able dict).
- :class:`RobertaTokens`: the folder's tokenizer as a callable, questions -> int64 (B, max_length): ``<s> ...
  </s>`` then the pad id, cut at ``max_length`` (METER's max_text_len is 40 for VQA). Picklable (the tokenizer is
  loaded again in another process).
- :func:`load_roberta` both, with the folder's weights.

Nothing is ever downloaded: every transformers call passes ``local_files_only=True``, and a path that is not a folder
raises FileNotFoundError before transformers sees it (a bare name like "roberta-base" would otherwise be a Hub id).
transformers is optional (``florence.optional``: MissingOptionalDependency naming the pinned install command).
"""

from __future__ import annotations

import os

import torch
from torch import nn

MODEL_TYPES = ("roberta",)  # transformers' model_type of the checkpoints this stream runs


def _transformers():
    from florence.optional import require

    return require("transformers", "METER's RoBERTa text stream")


def _check_folder(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"roberta: {path!r} is not a folder; expected a local transformers RoBERTa folder "
                                "(config.json, model.safetensors or pytorch_model.bin, the tokenizer's files); it "
                                "is never downloaded")  # fmt: skip
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"roberta: {path} has no config.json (expected a transformers save_pretrained folder)")
    return os.fspath(path)


class RobertaStream(nn.Module):
    """``transformers.RobertaModel`` (no pooler) from ``config``: a RobertaConfig's ``to_dict()``, or around an
    already built ``model`` (``load_roberta``: the weights are not copied). ValueError for a config of another model
    type (its ``model_type`` named) or of a decoder (causal attention: ``<s>`` would have read nothing)."""

    def __init__(self, config: dict, model=None):
        super().__init__()
        transformers = _transformers()
        if not isinstance(config, dict) or config.get("model_type") not in MODEL_TYPES:
            got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"roberta: expected a RoBERTa config (model_type in {MODEL_TYPES}), got {got!r}")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("roberta: a decoder's config (is_decoder / add_cross_attention); METER's text stream is "
                             "RoBERTa's bidirectional encoder")  # fmt: skip
        cfg = transformers.RobertaConfig.from_dict({k: v for k, v in config.items() if k != "_name_or_path"})
        self.model = model if model is not None else transformers.RobertaModel(cfg, add_pooling_layer=False)
        self.config = {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}  # (no local path saved)
        self.width, self.pad_token_id = cfg.hidden_size, cfg.pad_token_id
        self.context_length = cfg.max_position_embeddings - cfg.pad_token_id - 1  # RoBERTa's positions start at pad+1

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 RoBERTa ids, mask (B, L) bool (True = a real token) -> (B, L, width)."""
        return self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()


class RobertaTokens:
    """The tokenizer of a local RoBERTa folder as ``__call__(texts: list[str]) -> int64 (len(texts), max_length)``.
    FileNotFoundError for a path that is not such a folder; ValueError for max_length < 2 (``<s>`` and ``</s>``)."""

    def __init__(self, path: str, max_length: int = 40):
        self.path = _check_folder(path)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2 (<s> and </s>), got {max_length!r}")
        self.max_length = max_length
        self._tokenizer = None

    def __getstate__(self):
        return {"path": self.path, "max_length": self.max_length, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _transformers().AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def __call__(self, texts) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.max_length), dtype=torch.int64)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")  # fmt: skip
        return enc["input_ids"].to(torch.int64)


def load_roberta(path: str, max_length: int = 40) -> tuple[RobertaStream, RobertaTokens]:
    """(a :class:`RobertaStream` with the weights of the local folder ``path``, its :class:`RobertaTokens`).
    FileNotFoundError for a path that is not a folder with a config.json; ValueError for another model type; the
    transformers errors for missing weights; MissingOptionalDependency without transformers."""
    path = _check_folder(path)
    transformers = _transformers()
    pretrained = transformers.RobertaModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    stream = RobertaStream(pretrained.config.to_dict(), model=pretrained)
    tokens = RobertaTokens(path, max_length)
    if tokens.pad_token_id != stream.pad_token_id:
        raise ValueError(f"roberta: {path}'s tokenizer pads with {tokens.pad_token_id}, its model with "
                         f"{stream.pad_token_id}")  # fmt: skip
    if len(tokens.tokenizer) > pretrained.config.vocab_size:
        raise ValueError(f"roberta: {path}'s tokenizer has {len(tokens.tokenizer)} ids, its model embeds "
                         f"{pretrained.config.vocab_size}")  # fmt: skip
    if max_length > stream.context_length:
        raise ValueError(f"max_length: {max_length} is more than {path}'s {stream.context_length} positions")
    return stream, tokens
