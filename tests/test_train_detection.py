"""florence.train's task "detection" on the shared loop: the detector's CoSwin from a pretrained Florence's training
checkpoint (--init), exact resume from a checkpoint, COCO evaluation at intervals and at the end (detections.json in
COCO's results format, AP metrics), metrics and curve; 2 ranks (the positives averaged across ranks); config errors
naming the key."""

import json
import os
import shutil

import pytest
import torch

from florence.tasks import get_task
from florence.train import DEFAULTS, load_config
from tests.conftest import build_image_shards, pretrain_zero_steps, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from florence.data.detection import build_digit_canvases, curate_detection

    root = tmp_path_factory.mktemp("detect_train")
    build_digit_canvases(str(root / "canvases"), size=64, train_canvases=24, test_canvases=8, quiet=True)
    curate_detection(str(root / "canvases" / "train.json"), str(root / "shards"), shard_size=16)
    build_image_shards(root)
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A pretraining run of 0 steps, ZeRO 0: its checkpoint holds the parameters the run was built with."""
    out = tmp_path_factory.mktemp("pretrained") / "zero0"
    pretrain_zero_steps(data, out)
    return out


def _detect(data, out, *extra, nproc=1):
    return run_train([f"data.shards={data / 'shards'}", f"data.eval={data / 'canvases'}", "data.image_size=64",
                      "data.loader=torch", "task=detection", "model=florence_cpu_test", "detection.fpn_channels=32",
                      "detection.num_blocks=1", "detection.drop_path_rate=0.0", "batch_size=4", "precision=fp32",
                      "zero_stage=2", "schedule.warmup_steps=1", "schedule.min_lr_ratio=1.0", "optimizer.lr=0.001",
                      *extra], out, nproc, port_base=29700)  # fmt: skip


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_detection_task_from_a_pretraining_checkpoint_resumes_exactly(data, pretrained, tmp_path):
    from florence.models import load_florence

    cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=detection", "model=florence_cpu_test",
                             f"init={pretrained}", "detection.fpn_channels=32", "detection.num_blocks=1"])  # fmt: skip
    model = get_task("detection")(cfg, "cpu").build_model()
    visual = load_florence(str(pretrained)).visual.state_dict()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, visual[k], rtol=0, atol=0, msg=k)
    assert model.num_classes == 10 and len(model.dyhead.dyhead_blocks) == 1
    # an uninterrupted run against the same run restarted from its step-2 checkpoint (a copy whose latest is step 2)
    proc = _detect(data, tmp_path / "full", "steps=4", "checkpoint_interval=2", "eval_interval=2", "--init",
                   str(pretrained))  # fmt: skip
    assert "detection AP:" in proc.stdout
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    (tmp_path / "part" / "checkpoints" / "latest").write_text("step0000002")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step0000004")
    _detect(data, tmp_path / "part", "steps=4", "checkpoint_interval=2", "eval_interval=2", "--init", str(pretrained))
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(full) == [1, 2, 3, 4] and sorted(part) == [1, 2, 3, 4]
    for s in (3, 4):
        assert part[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, part, full)
    final = json.load(open(tmp_path / "full" / "final_metrics.json"))
    assert final["task"] == "detection"
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(final) and 0 <= final["AP"] <= final["AP50"] <= 1
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert all("images_per_s" in r for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "AP" in r] == [2, 4]
    dets = json.load(open(tmp_path / "full" / "detections.json"))
    gt = json.load(open(data / "canvases" / "test.json"))
    assert {d["image_id"] for d in dets} <= {im["id"] for im in gt["images"]}
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} and len(d["bbox"]) == 4 for d in dets)
    assert os.path.getsize(tmp_path / "full" / "loss_curve.png") > 1000


def test_two_ranks_train_from_scratch(data, tmp_path):
    """2 ranks, ZeRO 2, random initialisation: the loss normalisation's all-reduces run on both ranks (one of the
    step's images may have no positives), and the run evaluates at the end."""
    proc = _detect(data, tmp_path / "two", "steps=2", "checkpoint_interval=0", "eval_interval=0", nproc=2)
    assert "detection AP:" in proc.stdout
    final = json.load(open(tmp_path / "two" / "final_metrics.json"))
    assert final["world_size"] == 2 and 0 <= final["AP"] <= 1


def test_task_config_errors_name_the_key(data, tmp_path):
    assert set(DEFAULTS["detection"]) >= {"fpn_channels", "num_blocks", "scale_range", "eval_annotations"}
    cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=detection", "model=florence_cpu_test",
                             "detection.fpn_channels=40"])  # fmt: skip
    with pytest.raises(ValueError, match="fpn_channels: 40 is not a multiple of 16"):
        get_task("detection")(cfg, "cpu").build_model()
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    cfg = load_config(None, [f"data.shards={tmp_path}", "task=detection"])
    with pytest.raises(ValueError, match="lists no categories"):
        get_task("detection")(cfg, "cpu").categories()


def test_backbone_lr_multiplier_and_test_scale_reach_the_run(data, pretrained, tmp_path):
    """optimizer.lr_multipliers reaches DeepSpeed's optimizer (a backbone at 1e-9 x lr stays at the pretrained
    weights while the new layers move), and detection.eval_size evaluates the 64-px held-out canvases at 96 px with
    the boxes mapped back to the canvases' pixels."""
    from florence.models import load_florence

    out = tmp_path / "mult"
    _detect(data, out, "steps=2", "checkpoint_interval=0", "eval_interval=0", "optimizer.lr=0.01",
            'optimizer.lr_multipliers={"backbone.": 1.0e-9}', "detection.eval_size=96", "--init",
            str(pretrained))  # fmt: skip
    ckpt = torch.load(out / "checkpoints" / "step0000002" / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]  # fmt: skip
    visual = load_florence(str(pretrained)).visual.state_dict()
    backbone = {k[len("backbone.") :]: v for k, v in ckpt.items() if k.startswith("backbone.")}
    assert backbone, sorted(ckpt)[:5]
    for k, v in backbone.items():
        torch.testing.assert_close(v, visual[k], rtol=0, atol=1e-8, msg=k)
    # the parameters the run started from: the same command at 0 steps (its checkpoint holds them)
    _detect(data, tmp_path / "start", "steps=0", "checkpoint_interval=0", "eval_interval=0", "data.eval=null",
            "--init", str(pretrained))  # fmt: skip
    start = torch.load(tmp_path / "start" / "checkpoints" / "step0000000" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]  # fmt: skip
    assert all(torch.equal(start["backbone." + k], visual[k]) for k in backbone)
    moved = [k for k, v in start.items() if not k.startswith("backbone.") and v.is_floating_point()
             and not torch.equal(v, ckpt[k])]  # fmt: skip
    assert any(k.startswith("dyhead.") for k in moved) and any(k.startswith("fpn.") for k in moved), moved
    dets = json.load(open(out / "detections.json"))
    gt = json.load(open(data / "canvases" / "test.json"))
    assert dets and max(max(d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]) for d in dets) <= 64 + 1e-3
    assert {(im["width"], im["height"]) for im in gt["images"]} == {(64, 64)}


def test_eval_size_errors_name_the_key(data):
    for bad in (100, 0, True, "large", 64.0):  # refused when the config loads, before any process group or model
        with pytest.raises(ValueError, match="detection.eval_size: expected a positive multiple of 32"):
            load_config(None, [f"data.shards={data / 'shards'}", f"data.eval={data / 'canvases'}", "task=detection",
                               f"detection.eval_size={bad}"])  # fmt: skip
    cfg = load_config(None, [f"data.shards={data / 'shards'}", f"data.eval={data / 'canvases'}", "task=detection",
                             "data.image_size=64", "detection.eval_size=128", "data.loader=torch"])  # fmt: skip
    eval_set = get_task("detection")(cfg, "cpu").load_eval()
    assert eval_set["images"].shape[1:] == (3, 128, 128) and torch.all(eval_set["scales"] == 2.0)


def test_demo_prints_the_headline_lines_and_writes_its_summary(data, pretrained, tmp_path):
    """florence.demos.detection (make demo-detect) on the test data: both runs, summary.json, the curve plot and the
    two headline lines last."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    config = tmp_path / "detect.yaml"
    config.write_text(json.dumps({
        "task": "detection", "model": "florence_cpu_test", "batch_size": 4, "precision": "fp32", "zero_stage": 2,
        "steps": 2, "eval_interval": 1, "checkpoint_interval": 0, "schedule": {"warmup_steps": 1},
        "data": {"shards": str(data / "shards"), "eval": str(data / "canvases"), "image_size": 64, "loader": "torch"},
        "detection": {"fpn_channels": 32, "num_blocks": 1, "drop_path_rate": 0.0, "eval_size": 96},
        "optimizer": {"lr": 1e-3, "lr_multipliers": {"backbone.": 0.5}}}))  # fmt: skip
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "florence.demos.detection", "--init", str(pretrained), "--config", str(config),
           "--out", str(out), "--nproc", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("detection AP: ") and "random init" in lines[-2], lines[-4:]
    assert lines[-1].startswith("AP50: ") and "(random init " in lines[-1], lines[-4:]
    summary = json.load(open(out / "summary.json"))
    assert set(summary) == {"pretrained", "random"} and all(r["step"] == 2 for r in summary.values())
    assert f"{summary['pretrained']['AP50']:.3f}" in lines[-1] and f"{summary['random']['AP']:.3f}" in lines[-2]
    assert os.path.getsize(out / "ap_curves.png") > 1000
