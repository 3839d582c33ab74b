"""One-line drop-ins for the models people already have: ``florence_kernels.patch(model)``.

``patch`` walks a model, switches the computation of every module it supports to the fused ops in place (the module's
own parameters and buffers are used as they are: state dicts do not change), and returns a :class:`PatchReport`
(counts per module type, and every module it recognised but left alone, with the reason). ``unpatch`` restores the
original forward. Supported (each peer's geometry exactly, see :mod:`florence_kernels.ops.window_conventions`):

- timm (``florence_kernels.integrations.timm``): ``SwinTransformerBlock`` (Swin) and ``SwinTransformerV2Block``
  (Swin V2: cosine attention, continuous position bias), their window attention.
- torchvision (``florence_kernels.integrations.torchvision``): ``ShiftedWindowAttention`` (swin_t/s/b),
  ``ShiftedWindowAttentionV2`` (swin_v2_t/s/b), ``ShiftedWindowAttention3d`` (swin3d_t/s/b), ``ops.DeformConv2d``.
- open_clip's ``ClipLoss``: a class with its constructor and call (``florence_kernels.integrations.open_clip``).

Patches are instance attributes (``module.forward`` or timm's ``block._attn``), so ``unpatch`` and ``copy.deepcopy``
behave; a patched module keeps its class, parameters, hooks and ``train()``/``eval()`` state.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

PATCH_ATTR = "_florence_kernels_patch"  # on a patched module: {"attr": name of the replaced method, "backend": ...}
LIBRARIES = ("timm", "torchvision")


@dataclass(frozen=True)
class Patcher:
    """How to patch one module class: ``attr`` (the method replaced on the instance), ``make(module, backend)``
    returns the fused method, ``check(module)`` a reason not to patch (or None)."""

    cls: type
    attr: str
    make: object
    check: object = None


@dataclass
class PatchReport:
    """What :func:`patch` did: ``patched`` {module type: count}; ``skipped`` [(module path, type, reason)]."""

    model: str
    patched: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.patched)

    def __str__(self) -> str:
        if not self.patched and not self.skipped:
            return f"florence_kernels.patch: nothing to patch in {self.model} (no supported module: see " \
                   "florence_kernels.integrations)"  # fmt: skip
        lines = [f"florence_kernels.patch: {self.model}: {sum(self.patched.values())} modules patched"]
        lines += [f"  {name}: {n}" for name, n in sorted(self.patched.items())]
        lines += [f"  left alone: {path or '<model>'} ({name}): {why}" for path, name, why in self.skipped]
        return "\n".join(lines)


def _patchers(libraries) -> list[Patcher]:
    found = []
    for lib in libraries:
        if lib not in LIBRARIES:
            raise ValueError(f"libraries: expected names from {LIBRARIES}, got {lib!r}")
        if importlib.util.find_spec(lib) is None:  # not installed: nothing of it can be in the model
            continue
        found += importlib.import_module(f"{__name__}.{lib}").patchers()
    return found


def _unsupported(libraries) -> dict[type, str]:
    out = {}
    for lib in libraries:
        if importlib.util.find_spec(lib) is not None:
            out |= importlib.import_module(f"{__name__}.{lib}").unsupported()
    return out


def patch(model: nn.Module, *, backend: str | None = None, libraries=LIBRARIES) -> PatchReport:
    """Switch every supported module of ``model`` to the fused ops, in place; returns a :class:`PatchReport`.

    Args:
        model: any nn.Module (a supported module itself, or a model containing them).
        backend: forwarded to the ops (None: automatic per input; "reference", "torch", "cpp", "triton", "cuda").
        libraries: which integrations to apply (default all: "timm", "torchvision").

    Exactness: each patched module computes what it computed before (same geometry, masks, bias and padding as the
    peer's code; see :mod:`florence_kernels.ops.window_conventions`), to floating-point rounding; tests compare whole
    models, logits and every gradient, in fp64 and fp32. Already patched modules are left as they are (patching
    twice is harmless). A model with nothing supported is returned unchanged, with a warning.

    Raises:
        TypeError if ``model`` is not an nn.Module; ValueError for an unknown library name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    table = {p.cls: p for p in _patchers(libraries)}
    unsupported = _unsupported(libraries)
    report = PatchReport(type(model).__name__)
    for path, module in model.named_modules():
        cls = type(module)
        if cls in unsupported:
            report.skipped.append((path, cls.__name__, unsupported[cls]))
            continue
        p = table.get(cls)
        if p is None:
            bases = [b for b in table if isinstance(module, b)]
            if bases:
                report.skipped.append((path, cls.__name__, f"a subclass of {bases[0].__qualname__}: its forward may "
                                       "differ from the one the patch reproduces"))  # fmt: skip
            continue
        if getattr(module, PATCH_ATTR, None) is not None:
            report.patched[cls.__qualname__] += 1
            continue
        reason = p.check(module) if p.check is not None else None
        if reason:
            report.skipped.append((path, cls.__name__, reason))
            continue
        setattr(module, p.attr, types.MethodType(p.make(backend), module))
        object.__setattr__(module, PATCH_ATTR, {"attr": p.attr, "backend": backend})
        report.patched[cls.__qualname__] += 1
    if not report.patched:
        warnings.warn(str(report), stacklevel=2)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every module :func:`patch` changed in ``model`` (in place); returns how many were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for module in model.modules():
        info = module.__dict__.get(PATCH_ATTR)
        if info is None:
            continue
        module.__dict__.pop(info["attr"], None)
        module.__dict__.pop(PATCH_ATTR)
        n += 1
    return n


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` itself was patched."""
    return PATCH_ATTR in module.__dict__


__all__ = ["PatchReport", "Patcher", "is_patched", "patch", "unpatch"]
