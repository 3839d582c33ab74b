"""Backends, their declared support, and the choice between them.

Every op has up to five backends: ``reference`` (the literal PyTorch code path of the paper's code),
``torch`` (fast portable PyTorch, the CPU default), ``cpp`` (the extension's C++ CPU code), ``triton``
and ``cuda``. A backend declares the devices, dtypes and minimum compute capability it supports and
answers :meth:`Backend.not_supported_reasons` for a given input (xFormers' practice).

Automatic choice tries cuda -> triton -> torch for CUDA tensors and cpp -> torch for CPU tensors, falls
back quietly and logs why at debug level. An explicit ``backend=`` (or ``FLORENCE_BACKEND``) that
cannot run raises :class:`BackendNotSupportedError` listing every reason.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import _env

logger = logging.getLogger("florence_kernels")

BACKEND_NAMES = ("reference", "torch", "cpp", "triton", "cuda")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendNotSupportedError(RuntimeError):
    """An explicitly requested backend cannot run this input."""


# --- what this process can run -------------------------------------------------------------------------------


@functools.cache
def extension_build_info() -> dict | None:
    """florence_kernels._C's build info, or None when it is not built/importable."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.florence_kernels_C)
    except ImportError as e:
        logger.debug("florence_kernels._C not importable: %s", e)
        return None
    return dict(_C.build_info())


def extension_import_error() -> str | None:
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return f"florence_kernels._C is not built or failed to import ({e}); run `make install`"
    return None


@functools.cache
def triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type`` (the fused ops then compute in it, as the
    matmul-like ops they replace would), else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(device_type: str, *tensors):
    """``tensors`` (None passes through) cast to the autocast dtype where autocast is on, else unchanged."""
    dt = autocast_dtype(device_type)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


# --- backends ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One implementation of an op and what it supports.

    ``impl_reasons`` gives op-specific limits (sizes, layouts) as a list of strings for given inputs.
    ``auto_reasons`` (same call) gives reasons the automatic choice passes this backend over although it can run the
    input (it is measured slower there, e.g. on a CPU without the ISA its kernel is tuned for); an explicit request
    still runs it.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    min_compute_capability: tuple[int, int] | None = None
    impl_reasons: Callable[..., list[str]] | None = field(default=None, compare=False)
    auto_reasons: Callable[..., list[str]] | None = field(default=None, compare=False)

    def environment_reasons(self, device_type: str) -> list[str]:
        """Why this backend cannot run on ``device_type`` in this process, whatever the input."""
        reasons = []
        if device_type not in self.devices and not (
            self.name == "triton" and device_type == "cpu" and _env.TRITON_INTERPRET
        ):
            if self.name == "triton" and device_type == "cpu":
                reasons.append("triton runs on CPU tensors only under the interpreter (FLORENCE_TRITON_INTERPRET=1)")
            else:
                reasons.append(f"{self.name} runs on {'/'.join(self.devices)} tensors, not {device_type}")
        if self.name == "cpp" or self.name == "cuda":
            err = extension_import_error()
            if err:
                reasons.append(err)
            elif self.name == "cuda" and not extension_build_info()["cuda"]:
                reasons.append("florence_kernels._C was built without CUDA (FLORENCE_SKIP_CUDA_BUILD=1 or no nvcc)")
        if self.name == "triton" and triton_version() is None:
            reasons.append("triton is not installed")
        if device_type == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        return reasons

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor], **kwargs) -> list[str]:
        """Every reason this backend cannot run these inputs; empty when it can."""
        t0 = tensors[0]
        reasons = self.environment_reasons(t0.device.type)
        for t in tensors[1:]:
            if t.device != t0.device:
                reasons.append(f"inputs are on different devices ({t0.device} and {t.device})")
        if t0.dtype not in self.dtypes:
            reasons.append(f"dtype {t0.dtype} not in {[str(d).replace('torch.', '') for d in self.dtypes]}")
        if (
            self.min_compute_capability is not None
            and t0.device.type == "cuda"
            and torch.cuda.is_available()
            and _cuda_capability(t0.device) < self.min_compute_capability
        ):
            cc = _cuda_capability(t0.device)
            reasons.append(
                f"compute capability {cc[0]}.{cc[1]} < required {'.'.join(map(str, self.min_compute_capability))}"
            )
        if self.impl_reasons is not None and not reasons:
            reasons += self.impl_reasons(*tensors, **kwargs)
        return reasons


@dataclass
class Op:
    """A public op and its backends, in the registry that info, the README table and the tests read."""

    name: str
    backends: dict[str, Backend]

    def select(self, tensors: Sequence[torch.Tensor], backend: str | None = None, **kwargs) -> str:
        """Name of the backend to run: ``backend`` if given (or FLORENCE_BACKEND), else the first that can."""
        requested = backend or _env.forced_backend()
        if requested is not None:
            if requested not in self.backends:
                raise BackendNotSupportedError(
                    f"{self.name}: unknown backend {requested!r}; this op has {sorted(self.backends)}"
                )
            reasons = self.backends[requested].not_supported_reasons(tensors, **kwargs)
            if reasons:
                raise BackendNotSupportedError(
                    f"{self.name}: backend {requested!r} cannot run this input "
                    f"({_describe(tensors)}):\n  - " + "\n  - ".join(reasons)
                )
            return requested
        device_type = tensors[0].device.type
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            if name not in self.backends:
                continue
            candidate = self.backends[name]
            reasons = candidate.not_supported_reasons(tensors, **kwargs)
            if not reasons and candidate.auto_reasons is not None:
                reasons = candidate.auto_reasons(*tensors, **kwargs)
            if not reasons:
                return name
            logger.debug("%s: skipping backend %s: %s", self.name, name, "; ".join(reasons))
        return "torch"


def _describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}" for t in tensors)


OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    OPS[op.name] = op
    return op


def fresh_output(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own (not a view), same storage, no copy: what a custom op returns. Autograd refuses to
    update in place a view that comes out of a custom Function ("a view ... created inside a custom Function"), and
    callers do update outputs in place (SwinBlock3D sums its residual into the attention branch with ``add_``). A
    kernel that computes into a larger buffer or a permuted layout hands back a view; this re-wraps the same memory
    (the base is an intermediate of the op, referenced by nothing else)."""
    if not t._is_view():
        return t
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())  # fmt: skip
