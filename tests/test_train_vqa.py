"""florence.train's task "vqa" on the shared loop: METER on a pretraining checkpoint's towers (--init), exact resume,
VQA accuracy overall and per question type at intervals and at the end (predictions.json in VQA's results format);
the question-only baseline on 2 ranks; the demo end to end; config errors naming the key."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from florence.tasks import get_task
from florence.train import DEFAULTS, load_config
from tests.conftest import REPO_ROOT, build_image_shards, make_tiny_roberta, pretrain_zero_steps, requires, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("open_clip")  # the tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from florence.data.vqa import build_digit_questions, curate_vqa

    root = tmp_path_factory.mktemp("vqa_train")
    build_digit_questions(str(root / "raw"), size=64, train_canvases=24, test_canvases=8, quiet=True)
    curate_vqa(str(root / "raw" / "train.json"), str(root / "shards"), shard_size=16, quiet=True)
    build_image_shards(root)
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "zero0"
    pretrain_zero_steps(data, out)
    return out


def _vqa(data, out, *extra, nproc=1):
    return run_train([f"data.shards={data / 'shards'}", f"data.eval={data / 'raw'}", "data.image_size=64",
                      "data.loader=torch", "task=vqa", "model=florence_cpu_test", "vqa.width=32", "vqa.heads=4",
                      "vqa.layers=1", "vqa.dropout=0.0", "batch_size=8", "precision=fp32", "zero_stage=2",
                      "schedule.warmup_steps=1", "schedule.min_lr_ratio=1.0", "optimizer.lr=0.001", *extra],
                     out, nproc, port_base=29800)  # fmt: skip


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_vqa_task_from_a_pretraining_checkpoint_resumes_exactly(data, pretrained, tmp_path):
    from florence.models import load_florence

    cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", "model=florence_cpu_test",
                             f"init={pretrained}", "vqa.width=32", "vqa.heads=4", "vqa.layers=1"])  # fmt: skip
    model = get_task("vqa")(cfg, "cpu").build_model()
    flo = load_florence(str(pretrained))
    for k, v in flo.text.state_dict().items():
        assert torch.equal(model.text.state_dict()[k], v), k
    assert torch.equal(model.visual.embeds[0].proj.weight, flo.visual.embeds[0].proj.weight)
    answers = json.load(open(data / "shards" / "manifest.json"))["answers"]
    assert model.vqa_head[-1].out_features == len(answers) and not hasattr(model, "itm_head")
    # chunk_size 2 of the per-rank 8: each micro-batch takes its own questions' images (the index remapped)
    proc = _vqa(data, tmp_path / "full", "steps=4", "checkpoint_interval=2", "eval_interval=2", "chunk_size=2",
                "--init", str(pretrained))  # fmt: skip
    assert "vqa accuracy:" in proc.stdout
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    (tmp_path / "part" / "checkpoints" / "latest").write_text("step0000002")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step0000004")
    _vqa(data, tmp_path / "part", "steps=4", "checkpoint_interval=2", "eval_interval=2", "chunk_size=2", "--init",
         str(pretrained))  # fmt: skip
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(full) == [1, 2, 3, 4] and sorted(part) == [1, 2, 3, 4]
    for s in (3, 4):
        assert part[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, part, full)
    final = json.load(open(tmp_path / "full" / "final_metrics.json"))
    types = ("count", "exist", "position", "relation", "colour")
    assert final["task"] == "vqa" and 0 <= final["accuracy"] <= 1
    assert all(0 <= final[f"accuracy_{t}"] <= 1 for t in types)
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "accuracy" in r] == [2, 4]
    assert all("samples_per_s" in r for r in rows if "loss" in r)
    preds = json.load(open(tmp_path / "full" / "predictions.json"))
    test = json.load(open(data / "raw" / "test.json"))
    assert [p["question_id"] for p in preds] == [q["question_id"] for q in test["questions"]]
    assert all(set(p) == {"question_id", "answer"} and p["answer"] in answers for p in preds)
    from florence.data.vqa import vqa_accuracy

    acc = vqa_accuracy([p["answer"] for p in preds], [[a["answer"] for a in q["answers"]] for q in test["questions"]])
    assert final["accuracy"] == pytest.approx(acc.mean().item(), abs=1e-6)


def test_question_only_baseline_on_two_ranks(data, tmp_path):
    proc = _vqa(data, tmp_path / "qo", "steps=2", "checkpoint_interval=0", "eval_interval=0", "vqa.question_only=true",
                nproc=2)  # fmt: skip
    assert "vqa accuracy:" in proc.stdout
    final = json.load(open(tmp_path / "qo" / "final_metrics.json"))
    assert final["world_size"] == 2 and 0 <= final["accuracy"] <= 1


@requires("transformers")
def test_roberta_text_stream_from_a_local_folder_trains_and_evaluates(data, pretrained, tmp_path):
    """vqa.roberta: the folder's RoBERTa (weights and tokenizer) as the text stream, CoSwin from --init."""
    from florence.models import load_florence
    from florence.models.roberta import load_roberta

    folder = make_tiny_roberta(tmp_path / "roberta")
    cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", "model=florence_cpu_test",
                             f"init={pretrained}", "vqa.width=32", "vqa.heads=4", "vqa.layers=1",
                             f"vqa.roberta={folder}", "vqa.max_text_len=48"])  # fmt: skip
    task = get_task("vqa")(cfg, "cpu")
    model = task.build_model()
    stream, _ = load_roberta(folder)
    assert all(torch.equal(model.text.state_dict()[k], v) for k, v in stream.state_dict().items())
    assert torch.equal(model.visual.embeds[0].proj.weight, load_florence(str(pretrained)).visual.embeds[0].proj.weight)
    batch = next(iter(task.make_loader(0, 1, 8)))
    assert batch["tokens"].shape == (8, 48) and (batch["tokens"][:, 0] == 0).all()  # RoBERTa's <s>, not CLIP's ids
    proc = _vqa(data, tmp_path / "run", "steps=2", "checkpoint_interval=0", "eval_interval=0", f"vqa.roberta={folder}",
                "vqa.max_text_len=48", "--init", str(pretrained))  # fmt: skip
    assert "vqa accuracy:" in proc.stdout
    assert 0 <= json.load(open(tmp_path / "run" / "final_metrics.json"))["accuracy"] <= 1
    with pytest.raises(FileNotFoundError, match=r"vqa.roberta: roberta: 'roberta-base' is not a folder"):
        get_task("vqa")(load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", "vqa.roberta=roberta-base"]),
                        "cpu").build_model()  # fmt: skip


def test_demo_prints_the_headline_line_and_writes_its_summary(data, pretrained, tmp_path):
    config = tmp_path / "vqa.yaml"
    config.write_text(json.dumps({
        "task": "vqa", "model": "florence_cpu_test", "batch_size": 8, "precision": "fp32", "zero_stage": 2,
        "steps": 2, "eval_interval": 1, "checkpoint_interval": 0, "schedule": {"warmup_steps": 1},
        # configs/vqa.yaml's multipliers: the question-only run (no image tower) drops "visual."
        "optimizer": {"lr_multipliers": {"visual.": 0.1, "text.": 0.1, "image_proj.": 1.0}},
        "data": {"shards": str(data / "shards"), "eval": str(data / "raw"), "image_size": 64, "loader": "torch"},
        "vqa": {"width": 32, "heads": 4, "layers": 1, "dropout": 0.0}}))  # fmt: skip
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "florence.demos.vqa", "--init", str(pretrained), "--config", str(config),
           "--out", str(out), "--nproc", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.load(open(out / "summary.json"))
    assert set(summary) == {"pretrained", "random", "question_only"}
    assert last.startswith(f"vqa accuracy: {100 * summary['pretrained']['accuracy']:.1f}% ")
    assert f"question-only {100 * summary['question_only']['accuracy']:.1f}%" in last
    assert os.path.getsize(out / "accuracy_curves.png") > 1000


def test_task_config_errors_name_the_key(data, tmp_path):
    assert set(DEFAULTS["vqa"]) >= {"width", "heads", "layers", "question_only", "eval_annotations"}
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    cfg = load_config(None, [f"data.shards={tmp_path}", "task=vqa"])
    with pytest.raises(ValueError, match="lists no answers"):
        get_task("vqa")(cfg, "cpu").answers()
    # one config's lr_multipliers serve the question-only model, which has no image side
    multipliers = (
        'optimizer.lr_multipliers={"visual.": 0.1, "text.": 0.1, "image_pooler.": 2.0, '
        '"text_layers.0.cross_attn.": 3.0, "text_layers.1.ln2.": 3.0, "text_layers.0.self_attn.": 0.5}'
    )
    for question_only, expected in ((False, {"visual.": 0.1, "text.": 0.1, "image_pooler.": 2.0,
                                             "text_layers.0.cross_attn.": 3.0, "text_layers.1.ln2.": 3.0,
                                             "text_layers.0.self_attn.": 0.5}),
                                    (True, {"text.": 0.1, "text_layers.0.self_attn.": 0.5})):  # fmt: skip
        cfg = load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", multipliers,
                                 f"vqa.question_only={str(question_only).lower()}"])  # fmt: skip
        assert get_task("vqa")(cfg, "cpu").lr_multipliers() == expected
    # the fusion's keys are checked when the config loads, before any process starts
    for key, value, message in (("width", "30", r"vqa.width: 30 must be a multiple of 4"),
                                ("width", "40", r"40 must be a multiple of 4 .* and of vqa.heads \(12\)"),
                                ("heads", "0", r"vqa.heads: expected an int >= 1, got 0"),
                                ("layers", "two", r"vqa.layers: expected an int >= 0, got 'two'"),
                                ("dropout", "1.0", r"vqa.dropout: expected a probability in \[0, 1\), got 1.0"),
                                ("drop_path_rate", "-0.1", r"vqa.drop_path_rate: expected a probability"),
                                ("mlp_ratio", "0", r"vqa.mlp_ratio: expected a positive number"),
                                ("eval_batch_size", "0", r"vqa.eval_batch_size: expected an int >= 1"),
                                ("question_only", "'yes'", r"vqa.question_only: expected true or false"),
                                ("roberta", "3", r"vqa.roberta: expected null or the path of a local RoBERTa"),
                                ("roberta", "''", r"vqa.roberta: expected null or the path of a local RoBERTa"),
                                ("max_text_len", "1", r"vqa.max_text_len: expected an int >= 2"),
                                ("attn_backend", "flash", r"vqa.attn_backend: expected one of \('sdpa', 'flash_attn'"),
                                ("questions_only", "true", r"vqa: unknown keys \['questions_only'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", f"vqa.{key}={value}"])
    with pytest.raises(ValueError, match=r"vqa.attn_backend: flash_attn runs in half precision; precision is 'fp32'"):
        load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", "vqa.attn_backend=flash_attn",
                           "precision=fp32"])  # fmt: skip
    with pytest.raises(ValueError, match="vqa: expected a mapping"):
        load_config(None, [f"data.shards={data / 'shards'}", "task=vqa", "vqa=null"])
    # another task's keys are its own business
    load_config(None, [f"data.shards={data / 'shards'}", "task=pretrain", "vqa.width=30"])


def test_images_of_gives_each_slice_its_own_images_once():
    from florence.tasks.vqa import _images_of

    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    index = torch.tensor([3, 3, 0, 4, 0])
    picked, rows = _images_of(images, index, False, "cpu")
    assert picked[:, 0, 0, 0].tolist() == [0.0, 3.0, 4.0] and rows.tolist() == [1, 1, 0, 2, 0]
    assert torch.equal(picked[rows], images[index])
    assert _images_of(images, index, True, "cpu") == (None, None)
