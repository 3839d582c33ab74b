"""Optional packages (florence.optional): where open_clip, DeepSpeed or DALI is absent, as on the GPU machine, the code
that needs it says so with the install command, the CLIs exit 2 with one line, benchmarks report a skip (not a
failure), and gpu_check's summary names what was skipped and why. Absence is simulated by blocking the import."""

import json
import os
import sys

import pytest
import torch

import florence
from florence import optional


@pytest.fixture
def without(monkeypatch):
    """without(name): make the optional package ``name`` unimportable for this test."""

    def block(name):
        module = optional.PACKAGES[name][0]
        for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, m)
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
        optional.missing.cache_clear()

    yield block
    optional.missing.cache_clear()


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match=r"name: 'flash' is not an optional package; known: open_clip, deepspeed"):
        optional.missing("flash")


def test_tokenizer_without_open_clip_names_the_install(without):
    without("open_clip")
    assert "pip install open_clip_torch==3.3.0" in optional.missing("open_clip")
    with pytest.raises(optional.MissingOptionalDependency, match=r"florence.Tokenizer: open_clip is not importable"):
        florence.Tokenizer(16)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):  # an ImportError for those who catch that
        florence.tokenizer.Tokenizer(77)


def test_roberta_stream_without_transformers_names_the_install(without, tmp_path):
    from florence.models.roberta import RobertaStream, RobertaTokens

    without("transformers")
    assert "pip install transformers==5.24.0" in optional.missing("transformers")
    with pytest.raises(optional.MissingOptionalDependency, match=r"METER's RoBERTa text stream: transformers is not"):
        RobertaStream({"model_type": "roberta"})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install transformers==5.24.0"):
        RobertaTokens(str(tmp_path))(["is there a seven?"])


def test_random_token_ids_need_no_tokenizer(without):
    without("open_clip")
    ids = florence.random_token_ids(3, 16, length=5, seed=0)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == 49406).all() and (ids[:, 6] == 49407).all() and (ids[:, 7:] == 0).all()
    assert ((ids[:, 1:6] >= 256) & (ids[:, 1:6] < 49000)).all()
    assert (ids.argmax(-1) == 6).all()  # the text tower pools at the end-of-text id, the largest
    assert torch.equal(ids, florence.random_token_ids(3, 16, length=5, seed=0))
    with pytest.raises(ValueError, match="length: 7 ids . start . end must fit context_length 8"):
        florence.random_token_ids(1, 8, length=7)
    with pytest.raises(ValueError, match=r"context_length: expected an int >= 3, got 16.0"):
        florence.random_token_ids(1, 16.0)
    with pytest.raises(ValueError, match=r"n: expected an int >= 0, got -1"):
        florence.random_token_ids(-1, 16)


def test_curate_cli_without_open_clip_exits_2_with_one_line(without, tmp_path, capsys):
    from florence.data import curate

    without("open_clip")  # refused before any input is read or output written
    rc = curate.main(["--input", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "florence.data.curate (it counts CLIP BPE tokens" in err and "pip install open_clip" in err
    assert not (tmp_path / "out").exists()


def test_train_cli_without_deepspeed_exits_2_before_any_process_group(without, tmp_path, capsys):
    from florence import train

    without("deepspeed")
    assert train.main(["--set", "steps=1", f"data.shards={tmp_path}"]) == 2
    assert "florence.train: deepspeed is not importable" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_dali_loader_without_dali_names_the_install(without, tmp_path):
    from florence.data.loader import DaliLoader, dali_available

    without("dali")
    assert "nvidia-dali-cuda130" in dali_available()
    with pytest.raises(optional.MissingOptionalDependency, match="DaliLoader: nvidia.dali is not importable"):
        DaliLoader(str(tmp_path), 4, 32)


def test_benchmarks_report_a_missing_package_as_skipped(without, tmp_path, capsys):
    from benchmarks.__main__ import main

    without("open_clip")
    without("deepspeed")
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    status = json.loads((tmp_path / "benchmarks_status.json").read_text())
    assert set(status["skipped"]) == {"loader", "train", "curate"} and not status["failed"]  # curate: open_clip too
    assert "deepspeed is not importable" in status["skipped"]["train"]
    assert {"window_attention", "contrastive_loss", "model", "dyhead"} <= set(status["ran"])
    assert "skipped loader: open_clip is not importable" in capsys.readouterr().out


def test_gpu_check_summary_names_skips_and_counts_failed_steps(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        import gpu_check_summary
    finally:
        sys.path.pop(0)
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped message="optional package missing: open_clip"/></testcase>'
        "</testsuite></testsuites>"
    )
    status = {"ran": ["dyhead"], "skipped": {"train": "deepspeed is not importable"}, "failed": {}}
    (tmp_path / "benchmarks_status.json").write_text(json.dumps(status))
    steps = "build 0 60 150;info 0 2 30;gpu_tests 1 100 150;benchmarks 124 130 130;"
    assert gpu_check_summary.main([str(tmp_path), "quick", steps]) == 2  # gpu_tests and benchmarks (its limit) failed
    out = capsys.readouterr().out
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in out and "stopped at its 130 s limit" in out
    assert "skipped (1 tests): optional package missing: open_clip" in out
    assert "skipped bench train: deepspeed is not importable" in out
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "quick" and [s["exit"] for s in doc["steps"]] == [0, 0, 1, 124]
    assert doc["steps"][2]["junit"]["skip_reasons"] == {"optional package missing: open_clip": 1}


@pytest.mark.skipif(optional.missing("open_clip") is not None, reason="curation needs open_clip")
def test_curation_without_ray_or_pyarrow_names_the_install(without, tmp_path, capsys):
    from florence.data import curate

    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    without("ray")
    argv = ["--input", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), "--quiet"]
    assert curate.main([*argv, "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "florence.data.curate --engine ray: ray.data is not importable" in err and "pip install ray[data]" in err
    without("pyarrow")
    argv = ["--input", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out2"), "--quiet"]
    assert curate.main(argv) == 2
    assert "(Parquet input): pyarrow.parquet is not importable" in capsys.readouterr().err
