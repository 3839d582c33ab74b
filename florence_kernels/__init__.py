"""Florence Kernels: fused Triton and CUDA C++ kernels for Florence, each a drop-in for a PyTorch reference.

import florence_kernels as fk
windows = fk.window_partition(x, window_size=(8, 7, 7), shift_size=(4, 3, 3))
x = fk.window_reverse(windows, window_size=(8, 7, 7), shape=x.shape, shift_size=(4, 3, 3))
"""

from . import _env  # noqa: F401  (must run before triton is imported: FLORENCE_TRITON_INTERPRET)
from ._dispatch import BACKEND_NAMES, OPS, Backend, BackendNotSupportedError, Op
from .ops.contrastive_loss import contrastive_loss
from .ops.conv_embed import conv_embed
from .ops.deform_conv import deform_conv2d, modulated_deform_conv2d
from .ops.dyhead import dyrelu, scale_aware_attention, scale_task_attention
from .ops.window_attention import window_attention
from .ops.window_partition import window_partition, window_reverse

from . import nn  # noqa: E402  # isort: skip  (after the ops it uses; fk.nn works after import, as torch.nn does)
from .integrations import PatchReport, patch, unpatch  # noqa: E402  # isort: skip

__version__ = "0.1.0"

_SUBMODULES = ("gradcache", "info", "integrations", "ops", "testing", "triton_aot")


def __getattr__(name):
    """The other submodules on first use (``fk.testing``, ``fk.gradcache``, ...)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND_NAMES",
    "OPS",
    "Backend",
    "BackendNotSupportedError",
    "Op",
    "contrastive_loss",
    "dyrelu",
    "scale_aware_attention",
    "scale_task_attention",
    "conv_embed",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "PatchReport",
    "patch",
    "unpatch",
    "nn",
    "window_attention",
    "window_partition",
    "window_reverse",
]
