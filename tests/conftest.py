"""Test tiers: fast CPU tests everywhere; Triton under its interpreter on machines without a GPU;
`gpu`-marked tests skip with a reason when no GPU is present; `extended` sweeps need
FLORENCE_RUN_EXTENDED_TESTS=1."""

import os

import pytest
import torch

# Decide before florence_kernels (and so Triton) is imported: without a GPU, Triton kernels run on CPU tensors
# under the interpreter; with one, they run compiled on the GPU.
os.environ.setdefault("FLORENCE_TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# ... and import it now, before any test module imports triton itself (pytest.importorskip("triton") would otherwise
# import it without TRITON_INTERPRET when such a module is collected first).
import florence_kernels  # noqa: E402, F401

RUN_EXTENDED = os.environ.get("FLORENCE_RUN_EXTENDED_TESTS", "0") == "1"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available (run benchmarks/gpu_check.sh on one)")
    no_ext = pytest.mark.skip(reason="long sweep: set FLORENCE_RUN_EXTENDED_TESTS=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "extended" in item.keywords and not RUN_EXTENDED:
            item.add_marker(no_ext)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def runnable_backends(op_name: str, device: str) -> list[str]:
    """Backends of an op that can run on `device` in this process (the interpreter counts for triton on CPU)."""
    import florence_kernels as fk

    op = fk.OPS[op_name]
    return [b for b, backend in op.backends.items() if not backend.environment_reasons(device)]


def requires(name: str):
    """Skip marker for a test that needs the optional package ``name`` (florence.optional: "open_clip",
    "deepspeed", "dali"), with the reason, install command included, where it is missing."""
    from florence.optional import missing

    reason = missing(name)
    return pytest.mark.skipif(reason is not None, reason=f"optional package missing: {reason}")
