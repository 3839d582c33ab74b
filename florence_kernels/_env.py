"""Process-wide switches, read once at import: the only environment variables the library honours.

FLORENCE_BACKEND=<name>        force one backend for every op (tests, benchmarks); an op that cannot run it raises.
FLORENCE_TRITON_INTERPRET=1    run Triton kernels on CPU tensors under Triton's interpreter. It sets
                               TRITON_INTERPRET=1, which Triton reads when a kernel is decorated. It works whatever
                               was imported first: when Triton is already loaded without the interpreter (``import
                               triton`` or ``import torchvision`` before florence_kernels), the @triton.jit functions
                               of Triton's own language library (tl.cdiv, tl.sigmoid, ...), decorated at that import
                               as compiled functions, are switched to interpreted ones here; where that cannot be
                               done, the import fails saying what to do.
                               Triton < 3.7's interpreter converts a loop bound to int with ``int(array)``, which
                               numpy >= 2.4 refuses for a 1-element array ("only 0-dimensional arrays can be
                               converted to Python scalars": every ``for i in range(0, n)`` over a runtime ``n``);
                               ``_fix_interpreter_scalar_index`` mends it in every process that imports us.
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


def _numpy_refuses_1d_int() -> bool:
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def _interpreter_has_scalar_index_bug(patch_lang_tensor) -> bool:
    """Whether this Triton's ``_patch_lang_tensor`` converts with ``int(self.handle.data)`` (Triton < 3.7)."""
    import inspect

    try:
        return "int(self.handle.data)" in inspect.getsource(patch_lang_tensor)
    except (OSError, TypeError):  # no source (a frozen install): assume the bug, the mended form is equivalent
        return True


def _fix_interpreter_scalar_index() -> bool:
    """Make the interpreter's ``tensor.__index__`` take the one element of a scalar's 1-element array (Triton 3.7+'s
    ``int(data.squeeze())``) where this Triton has the bug and numpy refuses ``int()`` of such an array. Returns
    whether the interpreter is mended (False: no Triton interpreter, a fixed Triton, or a numpy that still
    converts). Idempotent: a second call keeps the one wrapper."""
    if not _numpy_refuses_1d_int():
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_florence_fixed", False):
        return True
    if not _interpreter_has_scalar_index_bug(original):
        return False

    def _patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._florence_fixed = True
    _patch_lang_tensor.__wrapped__ = original
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


if TRITON_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        _interpret_loaded_triton()
if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):  # Triton's own reading
    _fix_interpreter_scalar_index()


def forced_backend() -> str | None:
    """The backend named by FLORENCE_BACKEND, or None. Read at every call so tests can monkeypatch it."""
    name = os.environ.get("FLORENCE_BACKEND", "").strip()
    return name or None
