"""Test helpers every op's tests share: the FlashAttention tolerance rule and exact-equality checks.

Rule (../shared/KERNELS.md): with ``ref`` computed in float32/float64 and ``out_torch`` plain PyTorch in the same
low precision as ``out``, require ``max|out - ref| <= 2 * max|out_torch - ref| + atol``.
"""

from __future__ import annotations

import torch


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(
    out: torch.Tensor, ref: torch.Tensor, out_torch: torch.Tensor, *, atol: float = 1e-6, what: str = "output"
) -> None:
    """FlashAttention's rule; the message names what was compared, the errors and the bound."""
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    err = _max_abs_diff(out, ref)
    allowed = 2 * _max_abs_diff(out_torch, ref) + atol
    if not (err <= allowed):  # also catches NaN
        raise AssertionError(
            f"{what}: max |out - ref| = {err:.3e} > allowed {allowed:.3e} "
            f"(2 * max |torch - ref| + atol {atol:.1e}); shape {tuple(out.shape)}, dtype {out.dtype}"
        )


def assert_bit_exact(out: torch.Tensor, ref: torch.Tensor, *, what: str = "output") -> None:
    """Gathers and scatters must reproduce the reference bit for bit (torch.equal)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        raise AssertionError(f"{what}: got {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
    if not torch.equal(out, ref):
        diff = (out.double() - ref.double()).abs()
        nz = int((diff != 0).sum()) + int(torch.isnan(diff).sum())
        first = tuple(int(i) for i in (diff != 0).nonzero()[0]) if nz and (diff != 0).any() else None
        raise AssertionError(
            f"{what}: not bit-exact: {nz} of {out.numel()} elements differ, max |diff| "
            f"{torch.nan_to_num(diff, nan=float('inf')).max().item():.3e}, first at index {first}; "
            f"shape {tuple(out.shape)}, dtype {out.dtype}"
        )
