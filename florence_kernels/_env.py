"""Process-wide switches, read once at import: the only environment variables the library honours.

FLORENCE_BACKEND=<name>        force one backend for every op (tests, benchmarks); an op that cannot run it raises.
FLORENCE_TRITON_INTERPRET=1    run Triton kernels on CPU tensors under Triton's interpreter. It sets
                               TRITON_INTERPRET=1, which Triton reads when a kernel is decorated. It works whatever
                               was imported first: when Triton is already loaded without the interpreter (``import
                               triton`` or ``import torchvision`` before florence_kernels), the @triton.jit functions
                               of Triton's own language library (tl.cdiv, tl.sigmoid, ...), decorated at that import
                               as compiled functions, are switched to interpreted ones here; where that cannot be
                               done, the import fails saying what to do.
"""

import os
import sys

TRITON_INTERPRET = os.environ.get("FLORENCE_TRITON_INTERPRET", "0") == "1"


def _interpret_loaded_triton() -> int:
    """Replace every compiled-mode @triton.jit function of the loaded ``triton.language`` modules by an interpreted
    one (the interpreter cannot call a compiled-mode function from a kernel: "Cannot call @triton.jit'd outside of the
    scope of a kernel"). Returns how many were switched; raises ImportError when this Triton has no such API."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError as e:  # pragma: no cover - an unknown Triton layout
        raise ImportError(
            "FLORENCE_TRITON_INTERPRET=1: Triton was imported before florence_kernels without TRITON_INTERPRET=1 and "
            f"its functions cannot be switched to the interpreter ({e}). Set TRITON_INTERPRET=1 (or "
            "FLORENCE_TRITON_INTERPRET=1) in the environment before Python starts, or import florence_kernels first."
        ) from e
    switched: dict[int, object] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                new = switched.setdefault(id(value), InterpretedFunction(value.fn))
                setattr(module, attr, new)
    return len(switched)


if TRITON_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        _interpret_loaded_triton()


def forced_backend() -> str | None:
    """The backend named by FLORENCE_BACKEND, or None. Read at every call so tests can monkeypatch it."""
    name = os.environ.get("FLORENCE_BACKEND", "").strip()
    return name or None
