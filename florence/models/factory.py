"""Named configurations (JSON files in florence/models/configs/) and the constructors that read them.

``list_models()`` names every config; ``create_model(name, **overrides)`` builds a Florence from one, overrides
merged into it (nested dicts key by key: ``create_model("florence_tiny", vision={"drop_path_rate": 0.0})``);
``create_coswin(name)`` builds the image tower alone: "coswin_tiny" is florence_tiny's vision config, and so on.
"""

from __future__ import annotations

import copy
import json
import os

from .coswin import CoSwin
from .florence import Florence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def list_models() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


def get_config(name: str) -> dict:
    """The config of ``name`` as a dict (a fresh copy), without its description."""
    names = list_models()
    if name not in names:
        raise ValueError(f"model name {name!r} is not registered; known: {', '.join(names)}")
    with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
        cfg = json.load(f)
    cfg.pop("description", None)
    return cfg


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def create_model(name: str, **overrides) -> Florence:
    """A freshly initialised Florence from the named config, with ``overrides`` merged in (``backend=`` included)."""
    return Florence(**_merge(get_config(name), overrides))


def create_coswin(name: str, **overrides) -> CoSwin:
    """CoSwin alone: "coswin_<size>" is the vision config of "florence_<size>"."""
    if not name.startswith("coswin_"):
        raise ValueError(f"CoSwin name {name!r}: expected coswin_<size>, sizes {[n[9:] for n in list_models()]}")
    return CoSwin(**_merge(get_config("florence_" + name[len("coswin_") :])["vision"], overrides))
