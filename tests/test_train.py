"""florence.train end to end on CPU (DeepSpeed's CPU accelerator, gloo): ZeRO stages 1-3 on 2 ranks give the
losses of 1 process without ZeRO on the same global batches; gradient cache on/off and activation checkpointing
on/off give the same parameters after a step; a run killed after a checkpoint and restarted continues with the
losses of the uninterrupted run; config errors name the key."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from florence.data import builtin, curate
from florence.train import load_config, lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    builtin.build_digits(str(root / "digits"), size=32)
    curate.main(["--input", str(root / "digits" / "train.jsonl"), "--out", str(root / "shards"), "--min-size", "8",
                 "--near-dup-threshold", "-1", "--shard-size", "256", "--quiet"])  # fmt: skip
    return root


def _args(data, out, **over):
    cfg = {"model": "florence_cpu_test", "model_overrides.vision.drop_path_rate": 0.0, "data.shards": data / "shards",
           "data.eval": "null", "data.image_size": 32, "data.loader": "torch", "data.num_workers": 0,
           "batch_size": 16, "chunk_size": 0, "precision": "fp32", "zero_stage": 0, "steps": 4, "seed": 0,
           "schedule.warmup_steps": 2, "optimizer.lr": 1e-3, "output_dir": out}  # fmt: skip
    cfg.update(over)
    return ["--set"] + [f"{k}={v}" for k, v in cfg.items()]


def _train(data, out, nproc=1, env=None, **over):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]  # fmt: skip
    cmd = launcher + ["-m", "florence.train"] + _args(data, out, **over)
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _rows(out):
    path = os.path.join(out, "metrics.jsonl")
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while the test polls
            pass
    return [r for r in rows if "loss" in r]


def _losses(out):
    return {r["step"]: r["loss"] for r in _rows(out)}


def _lrs(out):
    return {r["step"]: r["lr"] for r in _rows(out)}


def _params(out):
    ckpt = os.path.join(out, "checkpoints")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    state = torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return state


def test_zero_stages_on_two_ranks_match_one_process(data, tmp_path):
    _train(data, tmp_path / "one", steps=5)
    ref = _losses(tmp_path / "one")
    assert sorted(ref) == [1, 2, 3, 4, 5] and ref[5] < ref[1]
    # the learning rate each step ran at (lr 1e-3, 2 warm-up steps, then cosine over 3): step 1 at half the rate
    expected_lr = {1: 5e-4, 2: 1e-3, 3: 1e-3, 4: 7.5e-4, 5: 2.5e-4}
    assert _lrs(tmp_path / "one") == pytest.approx(expected_lr, rel=1e-9)
    for stage in (1, 2, 3):
        out = tmp_path / f"zero{stage}"
        _train(data, out, nproc=2, zero_stage=stage, steps=5)
        got = _losses(out)
        for s in ref:  # fp32; the reductions run in a different order on 2 ranks
            assert got[s] == pytest.approx(ref[s], rel=2e-5, abs=2e-5), (stage, s, got, ref)
        assert _lrs(out) == pytest.approx(expected_lr, rel=1e-9)


def test_gradient_cache_and_activation_checkpointing_give_the_same_parameters(data, tmp_path):
    # AdamW's first step is lr * g / (|g| + eps): with eps = 1e-6 it is lr * sign(g) wherever |g| >> 1e-6, blind to
    # the gradient's size, and amplifies fp32 rounding noise by lr / eps = 500 where |g| ~ 1e-9 (one element of
    # 73,728 of a merge's weight then moved 2.3e-6 apart). eps = 1e-3 makes the step proportional to the gradient
    # below ~1e-3: the comparison then sees the gradients themselves (a 2% error in a gradient of 1e-3 moves a
    # parameter by 2.5e-6 at the first step's lr of 5e-4), and rounding noise stays ~1e-9.
    for name, extra in (("plain", {}), ("cached", {"chunk_size": 4}), ("ckpt", {"activation_checkpointing": "true"})):
        _train(data, tmp_path / name, steps=1, **{"optimizer.eps": 1e-3}, **extra)
    a, b, c = _params(tmp_path / "plain"), _params(tmp_path / "cached"), _params(tmp_path / "ckpt")
    assert _losses(tmp_path / "plain")[1] == pytest.approx(_losses(tmp_path / "cached")[1], rel=1e-6)
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"gradient cache: {k}")
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6, msg=f"activation checkpointing: {k}")
    init = _params_after_zero_steps(data, tmp_path)
    moved = sum(not torch.equal(init[k], a[k]) for k in a)
    assert moved > len(a) // 2  # the step did update the parameters


def _params_after_zero_steps(data, tmp_path):
    _train(data, tmp_path / "none", steps=0)
    return _params(tmp_path / "none")


def test_killed_run_resumes_with_the_uninterrupted_losses(data, tmp_path):
    _train(data, tmp_path / "full", steps=8, checkpoint_interval=3)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "florence.train"] + _args(data, out, steps=8, checkpoint_interval=3)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, FLORENCE_TRAIN_STEP_DELAY="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step0000003" and max(_losses(out), default=0) >= 4:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_losses(out)) < 8
    _train(data, out, steps=8, checkpoint_interval=3)
    full, resumed = _losses(tmp_path / "full"), _losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, resumed, full)
    schedule = lr_lambda(load_config(None, _args(data, out, steps=8)[1:]))
    expected_lr = {s: 1e-3 * schedule(s - 1) for s in range(1, 9)}  # step s runs at the scheduler's (s - 1)th rate
    assert _lrs(tmp_path / "full") == pytest.approx(expected_lr, rel=1e-9)
    assert _lrs(out) == pytest.approx(expected_lr, rel=1e-9)  # steps 4-8 after the restart too


def test_exponent_notation_without_a_dot_is_a_float_in_files_and_overrides(tmp_path):
    # PyYAML's YAML 1.1 resolver reads 1e-3 as the string "1e-3" (the optimizer then failed comparing it with 0.0)
    (tmp_path / "c.yaml").write_text("optimizer: {lr: 1e-3, eps: 1E-8}\ndata: {shards: x}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["optimizer.weight_decay=5e-2", "schedule.min_lr_ratio=-2e-1",
                                                 "seed=12", "output_dir=1e3x"])  # fmt: skip
    o = cfg["optimizer"]
    assert (o["lr"], o["eps"], o["weight_decay"], cfg["schedule"]["min_lr_ratio"]) == (1e-3, 1e-8, 0.05, -0.2)
    assert all(type(v) is float for v in (o["lr"], o["eps"], o["weight_decay"]))
    assert cfg["seed"] == 12 and type(cfg["seed"]) is int and cfg["output_dir"] == "1e3x"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys \\['stepz'\\]"):
        (tmp_path / "c.yaml").write_text("stepz: 3\n")
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ValueError, match="data.shards: the curated shard folder"):
        load_config(None, ["steps=3"])
    with pytest.raises(ValueError, match="precision: expected fp32, bf16 or fp16"):
        load_config(None, ["data.shards=x", "precision=fp8"])


def test_lr_multipliers_give_each_parameter_the_longest_matching_prefix_factor():
    from florence.train import param_groups

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            nn = torch.nn
            self.model = nn.ModuleDict({"backbone": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
                                        "head": nn.Linear(2, 3)})  # fmt: skip
            self.scale = torch.nn.Parameter(torch.ones(()))  # outside the model: factor 1

    w = Wrapper()
    no_decay = {"model.backbone.0.bias", "model.head.bias", "scale"}
    mult = {"backbone.": 0.5, "backbone.1.": 0.25, "head.": 10}
    groups = param_groups(w, "model.", no_decay, 2e-3, 0.05, mult)
    names = {id(p): n for n, p in w.named_parameters()}
    got = [(g["lr"], g["lr_factor"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]
    assert got == [  # the unprefixed groups first, then the prefixes in sorted order: a layout factors do not change
        (2e-3, 1.0, 0.0, ["scale"]),
        (1e-3, 0.5, 0.05, ["model.backbone.0.weight"]),
        (1e-3, 0.5, 0.0, ["model.backbone.0.bias"]),
        (5e-4, 0.25, 0.05, ["model.backbone.1.bias", "model.backbone.1.weight"]),
        (2e-2, 10.0, 0.05, ["model.head.weight"]),
        (2e-2, 10.0, 0.0, ["model.head.bias"]),
    ]
    reordered = param_groups(w, "model.", no_decay, 2e-3, 0.05, mult | {"head.": 0.1, "backbone.": 3.0})
    assert [[id(p) for p in g["params"]] for g in reordered] == [[id(p) for p in g["params"]] for g in groups]
    plain = param_groups(w, "model.", no_decay, 2e-3, 0.05, {})
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain] == [(2e-3, 0.05, 4), (2e-3, 0.0, 3)]
    for bad, match in [({"backbone.": 0}, r"lr_multipliers\['backbone.'\]: expected a positive finite number, got 0"),
                       ({"backbone.": True}, "expected a positive finite number, got True"),
                       ({"head.": "2"}, "expected a positive finite number, got '2'"),
                       ({"backbone.": float("nan")}, "expected a positive finite number, got nan"),
                       ({"backbone.": float("inf")}, "expected a positive finite number, got inf"),
                       ({0: 0.5}, "keys are parameter-name prefixes \\(non-empty str\\), got 0"),
                       ({"bakcbone.": 0.5}, r"lr_multipliers\['bakcbone.'\]: no parameter name starts with it "
                                            r"\(top-level modules: \['backbone.', 'head.', 'scale.'\]\)"),
                       ([0.5], "expected a mapping of parameter-name prefix to factor, got \\[0.5\\]")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            param_groups(w, "model.", no_decay, 2e-3, 0.05, bad)


def test_lr_multipliers_are_checked_when_the_config_loads():
    cfg = load_config(None, ["data.shards=x", 'optimizer.lr_multipliers={"backbone.": 0.5, "head.": 2}'])
    assert cfg["optimizer"]["lr_multipliers"] == {"backbone.": 0.5, "head.": 2}
    with pytest.raises(ValueError, match=r"--set optimizer.lr_multipliers.backbone.: give the whole mapping"):
        load_config(None, ["data.shards=x", "optimizer.lr_multipliers.backbone.=0.5"])
    with pytest.raises(ValueError, match=r"lr_multipliers\['backbone.'\]: expected a positive finite number"):
        load_config(None, ["data.shards=x", 'optimizer.lr_multipliers={"backbone.": -1}'])
