"""python -m florence_kernels.info, and the README's ops table against the registry."""

import os
import re
import subprocess
import sys

import torch

from florence_kernels.info import format_info, gather_info, markdown_table
from tests.conftest import requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_table_matches_the_registry():
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- ops-table:start -->\n(.*?)\n<!-- ops-table:end -->", readme, re.S)
    assert m, "README.md lost its ops-table markers"
    assert m.group(1).strip() == markdown_table().strip(), (
        "README ops table is stale: paste the output of `python -m florence_kernels.info --markdown-table`"
    )


def test_readme_names_the_two_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in open(os.path.join(ROOT, ".ci", "run")).read()


def test_info_reports_every_backend_with_reasons():
    info = gather_info()
    rows = info["ops"]["window_partition"]
    assert set(rows) == {"reference", "torch", "cpp", "triton", "cuda"}
    assert rows["torch"]["runnable_here"] and rows["cpp"]["runnable_here"]
    if not torch.cuda.is_available():
        assert not rows["cuda"]["runnable_here"]
        assert "no CUDA device is available" in rows["cuda"]["here"]["cuda"]["reasons"]
        if info["extension"].get("cuda"):
            arch = info["extension"]["cuda_arch_list"]
            assert f"cuda       built ({arch}), not runnable here" in format_info(info)
    text = format_info(info)
    assert "window_partition:" in text and "torch " in text


def test_info_cli_runs():
    for flag in ([], ["--json"], ["--markdown-table"]):
        proc = subprocess.run([sys.executable, "-m", "florence_kernels.info", *flag], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "window_partition" in proc.stdout


@requires("open_clip")
def test_readme_usage_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in a scratch folder (the model example writes a checkpoint)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
