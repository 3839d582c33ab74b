"""The Florence two-tower model (../shared/SPEC.md sections 3-4): CoSwin and the text transformer, two bias-free
projections to a shared dimension D, L2 normalisation, a learnable logit scale (CLIP's init log(1/0.07), clamped at
log(100) when used).

``encode_image(images)`` -> (B, D), ``encode_text(tokens)`` -> (B, D), both unit-norm (``normalize=False`` for the
raw projections); ``forward(images, tokens)`` -> (image_emb, text_emb, scale) with scale = exp(clamped logit scale),
what ``florence_kernels.contrastive_loss`` takes. ``save_pretrained(dir)`` / ``Florence.from_pretrained(dir)``
write and read ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from florence_kernels._io import atomic_write, atomic_write_text

from .coswin import CoSwin
from .text import TextTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Florence(nn.Module):
    """Image tower + text tower + projections + logit scale.

    Args:
        embed_dim: D, the shared embedding size.
        vision: CoSwin's keyword arguments; text: TextTransformer's.
        init_logit_scale, max_logit_scale: the temperature's log at init and its cap.
        backend: florence_kernels backend for the image tower's ops (None: automatic).
    """

    def __init__(self, embed_dim: int, vision: dict, text: dict, init_logit_scale: float = math.log(1 / 0.07),
                 max_logit_scale: float = math.log(100.0), backend: str | None = None):  # fmt: skip
        super().__init__()
        self.config = {"embed_dim": embed_dim, "vision": dict(vision), "text": dict(text),
                       "init_logit_scale": init_logit_scale, "max_logit_scale": max_logit_scale}  # fmt: skip
        self.visual = CoSwin(**vision, backend=backend)
        self.text = TextTransformer(**text)
        self.image_projection = nn.Linear(self.visual.num_features, embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.num_features, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=self.visual.num_features**-0.5)
        nn.init.normal_(self.text_projection.weight, std=self.text.num_features**-0.5)
        # shape (1,), not 0-dim: DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale
        self.embed_dim = embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_projection(self.visual.forward_features(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_projection(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(min(logit_scale, max_logit_scale)): the similarity multiplier (no gradient above the cap)."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp().squeeze(0)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens), self.scale()

    def no_weight_decay_names(self) -> set[str]:
        """Parameters AdamW should not decay: norms, biases, position tables (relative and absolute), logit scale."""
        names = set()
        for name, p in self.named_parameters():
            if p.dim() <= 1 or "relative_position_bias_table" in name or name.endswith("positional_embedding"):
                names.add(name)
        return names

    # --- save / load ---------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """Write config.json and model.safetensors into ``directory``; each file appears whole or not at all."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(
            os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
        )
        atomic_write_text(
            os.path.join(directory, CONFIG_NAME), json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu", **overrides) -> Florence:
        """A model saved by :meth:`save_pretrained`. Missing or unexpected weights raise a ValueError naming them."""
        from safetensors.torch import load_file

        cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (cfg_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{directory}: no {os.path.basename(path)} (expected a save_pretrained folder)")
        with open(cfg_path) as f:
            config = json.load(f)
        model = cls(**(config | overrides))
        state = load_file(weights_path, device=str(map_location))
        load_state_dict_strict(model, state, source=weights_path)
        return model


def load_state_dict_strict(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    """load_state_dict that names every missing and unexpected key (and shape mismatch) in one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))  # fmt: skip
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{what}: {shown}")
        raise ValueError(f"{source} does not match the model ({type(model).__name__}): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_tagged_folder(model: nn.Module, directory: str, tag: str) -> None:
    """``model``'s weights (model.safetensors) and ``{"model": tag, **model.config}`` (config.json) in ``directory``,
    each written whole or not at all: the save_pretrained of the adapters (ATSSDetector, METER)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, "model.safetensors"),
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))  # fmt: skip
    atomic_write_text(os.path.join(directory, "config.json"),
                      json.dumps({"model": tag, **model.config}, indent=2, sort_keys=True) + "\n")  # fmt: skip


def load_tagged_folder(cls, directory: str, tag: str, name: str, map_location="cpu", **overrides):
    """``cls(**(config | overrides))`` with the weights of a :func:`save_tagged_folder` folder. FileNotFoundError for
    a folder without its files; ValueError for a config not tagged ``tag`` (naming ``name``, the class) or weights
    that do not match (naming them)."""
    from safetensors.torch import load_file

    cfg_path, weights = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no {os.path.basename(path)} (expected a save_pretrained folder)")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.pop("model", None) != tag:
        raise ValueError(f'{cfg_path}: not {name} config (no "model": "{tag}")')
    model = cls(**(config | overrides))
    load_state_dict_strict(model, load_file(weights, device=str(map_location)), source=weights)
    return model
