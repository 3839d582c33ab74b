"""contrastive_loss: a hand-computed UniCL example, every backend against the literal reference (loss and the
gradients of both features and of the logit scale, FlashAttention's tolerance rule), open_clip's ClipLoss, the
tiled path never allocating N x N, two real gloo processes against one, and the UniCLLoss module."""

import math

import pytest
import torch

import florence_kernels as fk
from florence_kernels.ops import contrastive_loss as cl
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import runnable_backends

CPU_BACKENDS = [b for b in runnable_backends("contrastive_loss", "cpu") if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _features(N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    v = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    return u.to(dtype), v.to(dtype)


def _run(u, v, scale, labels, backend, dtype):
    u = u.to(dtype).requires_grad_()
    v = v.to(dtype).requires_grad_()
    t = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    loss = fk.contrastive_loss(u, v, t, labels, backend=backend)
    loss.backward()
    return loss, u.grad, v.grad, t.grad


def test_hand_computed_unicl_example():
    """u = [e1, e2, e1], v = [e1, e1, e2], tau = 1, labels [5, 5, 7]: s = [[1,1,0],[0,0,1],[1,1,0]].
    Rows: lse r0 = r2 = log(2e+1), r1 = log(e+2); P(0) = P(1) = {0, 1}, P(2) = {2}:
      L_i2t = ((r0 - 1) + r1 + r2) / 3.   Columns: c0 = c1 = log(2e+1), c2 = log(e+2):
      L_t2i = ((c0 - 1/2) + (c1 - 1/2) + c2) / 3.   Both equal (2 log(2e+1) + log(e+2) - 1) / 3."""
    e = math.e
    expected = (2 * math.log(2 * e + 1) + math.log(e + 2) - 1) / 3
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([5, 5, 7])
    for backend in ["reference", "torch"]:
        loss = fk.contrastive_loss(u, v, torch.tensor(1.0, dtype=torch.float64), labels, backend=backend)
        assert loss.item() == pytest.approx(expected, rel=1e-7), backend


CASES = [  # (N, D, labels kind, tile)
    (37, 24, "unicl", 16),  # N not a multiple of the tile, D not a power of two
    (64, 32, None, 16),  # CLIP: all distinct
    (1, 8, "unicl", 16),  # N = 1
    (20, 16, "same", 8),  # all labels equal: every pair is positive
    (50, 40, "unicl", 1024),  # one tile
]


def _labels(kind, N):
    if kind is None:
        return None
    if kind == "same":
        return torch.full((N,), 3, dtype=torch.int64)
    return torch.randint(0, max(1, N // 3), (N,), generator=torch.Generator().manual_seed(N))


def _id(case):
    N, D, kind, tile = case
    return f"N{N}-D{D}-{kind}-tile{tile}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backends_against_reference(monkeypatch, case, dtype, backend):
    N, D, kind, tile = case
    monkeypatch.setattr(cl, "TORCH_TILE", tile)
    u, v = _features(N, D)
    labels = _labels(kind, N)
    ref = _run(u, v, 14.3, labels, "reference", torch.float64)
    low = _run(u, v, 14.3, labels, "reference", dtype)  # the literal formula in the same precision
    out = _run(u, v, 14.3, labels, backend, dtype)
    for name, o, r, t in zip(("loss", "grad image", "grad text", "grad logit_scale"), out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"contrastive_loss[{backend}] {_id(case)} "
                                                                  f"{dtype} {name}")  # fmt: skip


def test_extreme_scale_and_opposite_features():
    """tau = 100 with every pair at cosine -1 except the positives: no overflow or underflow in the tiles."""
    u = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    v = -u
    for backend in CPU_BACKENDS:
        got = fk.contrastive_loss(u.float(), v.float(), torch.tensor(100.0), backend=backend)
        ref = fk.contrastive_loss(u, v, torch.tensor(100.0, dtype=torch.float64), backend="reference")
        assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-5), backend


def test_matches_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    u, v = _features(33, 16, torch.float32)
    scale = torch.tensor(20.0)
    expected = open_clip_loss.ClipLoss()(u, v, scale)
    for backend in ["reference"] + CPU_BACKENDS:
        got = fk.contrastive_loss(u, v, scale, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=backend)


def test_torch_backend_never_allocates_n_by_n():
    """Every allocation of the tiled forward + backward stays far below N x N (the reference's logits)."""
    N, D, tile = 1024, 32, 128
    u, v = _features(N, D)
    u, v = u.requires_grad_(), v.requires_grad_()
    labels = _labels("unicl", N)
    old = cl.TORCH_TILE
    cl.TORCH_TILE = tile
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fk.contrastive_loss(u, v, torch.tensor(10.0, requires_grad=True), labels, backend="torch").backward()
    finally:
        cl.TORCH_TILE = old
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= 2 * tile * tile * 4, biggest  # one fp32 tile (or an N x D buffer, smaller here)
    assert biggest < N * N * 4 / 16


def test_bad_input_names_the_argument():
    u, v = _features(4, 8)
    with pytest.raises(ValueError, match=r"text_features: expected shape \(4, 8\)"):
        fk.contrastive_loss(u, v[:3], 1.0)
    with pytest.raises(ValueError, match=r"image_features: expected an \(N, D\) tensor, got shape \(8,\)"):
        fk.contrastive_loss(u[0], v[0], 1.0)
    with pytest.raises(ValueError, match=r"labels: expected an int64 tensor of shape \(4,\), got torch.int32"):
        fk.contrastive_loss(u, v, 1.0, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"logit_scale: expected a 0-dim tensor"):
        fk.contrastive_loss(u, v, torch.ones(2))
    with pytest.raises(fk.BackendNotSupportedError, match="triton"):
        fk.contrastive_loss(u.double(), v.double(), 1.0, backend="triton")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "torch"])
def test_custom_op_opcheck(backend):
    u, v = _features(9, 8)
    args = (u.requires_grad_(), v.requires_grad_(), torch.tensor(3.0, requires_grad=True), True, backend)
    torch.library.opcheck(cl._lse_pair_op, args, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))  # fmt: skip


# --- distributed: two gloo processes against one --------------------------------------------------------------------


def _worker(rank, world, init, backend, u, v, labels, scale, out_dir):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        n = u.shape[0] // world
        ul = u[rank * n : (rank + 1) * n].clone().requires_grad_()
        vl = v[rank * n : (rank + 1) * n].clone().requires_grad_()
        t = torch.tensor(scale, requires_grad=True)
        loss = fk.contrastive_loss(ul, vl, t, labels[rank * n : (rank + 1) * n], backend=backend)
        loss.backward()
        torch.save({"loss": loss.detach(), "du": ul.grad, "dv": vl.grad, "dt": t.grad}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_two_gloo_processes_equal_one(tmp_path, monkeypatch, backend):
    """Each rank gives the loss of its rows; their mean (what DDP averaging optimises) is the one-process loss on the
    concatenated batch, and the rank-averaged gradients (features: this rank's rows) are the one-process ones.
    Positives held by the other rank count (labels shared across ranks)."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname resolves to
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    world, N, D, scale = 2, 12, 16, 9.0
    u, v = _features(N, D)
    u, v = u.float(), v.float()
    labels = torch.tensor([0, 1, 2, 0, 4, 1, 3, 0, 2, 5, 4, 1])
    mp.spawn(_worker, args=(world, f"file://{tmp_path}/rdzv", backend, u, v, labels, scale, str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    single = _run(u, v, scale, labels, "reference", torch.float64)
    n = N // world
    torch.testing.assert_close(sum(p["loss"] for p in parts).double() / world, single[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(p["dt"] for p in parts).double() / world, single[3], rtol=1e-5, atol=1e-6)
    for r, p in enumerate(parts):
        rows = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(p["du"].double() / world, single[1][rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p["dv"].double() / world, single[2][rows], rtol=1e-4, atol=1e-6)


# --- the module ------------------------------------------------------------------------------------------------------


def test_unicl_module_scale_init_and_clamp():
    from florence_kernels.nn import UniCLLoss

    mod = UniCLLoss()
    assert mod.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    u, v = _features(6, 8)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    loss = mod(u.float(), v.float(), labels)
    ref = fk.contrastive_loss(u, v, torch.tensor(1 / 0.07, dtype=torch.float64), labels, backend="reference")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert mod.logit_scale.grad is not None and mod.logit_scale.grad != 0
    with torch.no_grad():
        mod.logit_scale.fill_(10.0)  # above the cap: the multiplier is 100 and no gradient passes the clamp
    mod.zero_grad()
    assert mod.scale().item() == pytest.approx(100.0)
    mod(u.float(), v.float(), labels).backward()
    assert mod.logit_scale.grad.item() == 0.0
