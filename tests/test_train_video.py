"""florence.train's task "video" on the shared loop: started from a pretrained Florence's training checkpoint (--init),
exact resume from a checkpoint, metrics/curve/final metrics, evaluation with the frame-shuffled score; and
florence.models.load_florence reading the checkpoints of ZeRO stages 0 and 3 (the parameters the run started
from)."""

import json
import os
import shutil

import pytest
import torch

from florence.data import builtin
from florence.data.video import curate_videos
from florence.tasks import get_task
from florence.train import DEFAULTS, load_config
from tests.conftest import build_image_shards, pretrain_zero_steps, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("av")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_train")
    builtin.build_moving_digits(str(root / "clips"), size=32, frames=8, limit=48, quiet=True)
    curate_videos([str(root / "clips" / "train.jsonl")], str(root / "shards"), shard_size=32)
    build_image_shards(root)
    return root


def _video(data, out, *extra):
    return run_train([f"data.shards={data / 'shards'}", f"data.eval={data / 'clips'}", "data.image_size=32",
                      "data.loader=pyav", "task=video", "model=florence_cpu_test", "video.frames=4",
                      "video.frame_stride=2", "batch_size=8", "precision=fp32", "zero_stage=2",
                      "schedule.warmup_steps=1", "schedule.min_lr_ratio=1.0", "optimizer.lr=0.001", *extra],
                  out)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A pretraining run of 0 steps, ZeRO 0: its checkpoint holds the parameters the run was built with."""
    out = tmp_path_factory.mktemp("pretrained") / "zero0"
    pretrain_zero_steps(data, out, 0)
    return out


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_load_florence_reads_zero_0_and_zero_3_checkpoints(data, pretrained, tmp_path):
    from florence.models import create_model, load_florence

    torch.manual_seed(0)  # what the run does before building its model
    expected = create_model("florence_cpu_test", vision={"drop_path_rate": 0.0}).state_dict()
    pretrain_zero_steps(data, tmp_path / "zero3", 3)
    for run in (pretrained, tmp_path / "zero3"):
        for path in (run, run / "checkpoints" / "step0000000"):
            got = load_florence(str(path)).state_dict()
            for k, v in expected.items():
                torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_video_task_from_a_pretraining_checkpoint_resumes_exactly(data, pretrained, tmp_path):
    pre = pretrained
    # the task's model starts from the inflated checkpoint
    cfg = load_config(None, [f"data.shards={data / 'shards'}", f"data.eval={data / 'clips'}", "task=video",
                             "model=florence_cpu_test", f"init={pre}"])  # fmt: skip
    model = get_task("video")(cfg, "cpu").build_model()
    from florence.models import load_florence

    stem2d = load_florence(str(pre)).visual.embeds[0].proj.weight
    torch.testing.assert_close(model.backbone.embeds[0].proj.weight, stem2d.unsqueeze(2).repeat(1, 1, 2, 1, 1) / 2)
    assert model.head.out_features == 40
    # an uninterrupted run against the same run restarted from its step-2 checkpoint (a copy whose latest is step 2)
    proc = _video(data, tmp_path / "full", "steps=4", "checkpoint_interval=2", "eval_interval=2", "--init", str(pre))
    assert "video top-1:" in proc.stdout
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    (tmp_path / "part" / "checkpoints" / "latest").write_text("step0000002")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step0000004")
    _video(data, tmp_path / "part", "steps=4", "checkpoint_interval=2", "eval_interval=2", "--init", str(pre))
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(full) == [1, 2, 3, 4] and sorted(part) == [1, 2, 3, 4]
    for s in (3, 4):
        assert part[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, part, full)
    final = json.load(open(tmp_path / "full" / "final_metrics.json"))
    assert final["task"] == "video" and 0 <= final["top1"] <= final["top5"] <= 1
    assert 0 <= final["top1_frames_shuffled"] <= 1
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert all("clips_per_s" in r for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "top1" in r] == [2, 4]
    assert os.path.getsize(tmp_path / "full" / "loss_curve.png") > 1000


def test_task_config_errors_name_the_key(data):
    with pytest.raises(ValueError, match="task: expected one of"):
        load_config(None, [f"data.shards={data / 'shards'}", "task=segmentation"])
    cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=video", "video.frame_mode=shuffled"])
    with pytest.raises(ValueError, match="video.frame_mode"):
        get_task("video")(cfg, "cpu")
    cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=video", "data.eval=null"])
    with pytest.raises(ValueError, match="video.num_classes"):
        get_task("video")(cfg, "cpu").num_classes()
    assert set(DEFAULTS["video"]) >= {"frames", "frame_stride", "window_size", "frame_mode"}


@torch.no_grad()
def test_zero_shot_head_starts_as_the_text_towers_classifier(data, pretrained):
    """video.head_init zero_shot: the first logits are Florence's zero-shot logits s cos(P f, t_k) up to the I3D
    head's N(0, 0.01) draw (the inflated video tower's features, the class names' prompt ensembles)."""
    pytest.importorskip("open_clip")
    from florence.eval import zero_shot_classifier
    from florence.models import FlorenceVideo, load_florence
    from florence.tokenizer import get_tokenizer

    cfg = load_config(None, [f"data.shards={data / 'shards'}", f"data.eval={data / 'clips'}", "task=video",
                             "model=florence_cpu_test", f"init={pretrained}", "video.head_init=zero_shot",
                             "video.frames=4", "video.frame_stride=2", "data.image_size=32", "data.loader=pyav",
                             "video.dropout=0.0"])  # fmt: skip
    task = get_task("video")(cfg, "cpu")
    model = task.build_model().eval()
    flo = load_florence(str(pretrained)).eval()
    tower = FlorenceVideo.from_florence(flo, window_size=model.backbone.window_sizes).eval()
    text = zero_shot_classifier(flo, task.class_names(), get_tokenizer(flo.text.context_length))
    clips = torch.randn(6, 3, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = tower.encode_video(clips) @ text.T * flo.scale()
    got = model(clips)
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.95
    assert (got - expected).abs().mean() < 0.5 * expected.abs().mean()
