"""Process-wide switches, read once at import: the only environment variables the library honours.

FLORENCE_BACKEND=<name>        force one backend for every op (tests, benchmarks); an op that cannot run it raises.
FLORENCE_TRITON_INTERPRET=1    run Triton kernels on CPU tensors under Triton's interpreter. It sets
                               TRITON_INTERPRET=1, which Triton reads when a kernel is decorated, so it must be
                               set before florence_kernels (and with it Triton) is imported.
"""

import os

TRITON_INTERPRET = os.environ.get("FLORENCE_TRITON_INTERPRET", "0") == "1"
if TRITON_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"


def forced_backend() -> str | None:
    """The backend named by FLORENCE_BACKEND, or None. Read at every call so tests can monkeypatch it."""
    name = os.environ.get("FLORENCE_BACKEND", "").strip()
    return name or None
