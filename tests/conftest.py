"""Test tiers: fast CPU tests everywhere; Triton under its interpreter on machines without a GPU;
`gpu`-marked tests skip with a reason when no GPU is present; `extended` sweeps need
FLORENCE_RUN_EXTENDED_TESTS=1."""

import os

import pytest
import torch

# Decide before florence_kernels (and so Triton) is imported: without a GPU, Triton kernels run on CPU tensors
# under the interpreter; with one, they run compiled on the GPU.
os.environ.setdefault("FLORENCE_TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# ... and import it now, before any test module imports triton itself (pytest.importorskip("triton") would otherwise
# import it without TRITON_INTERPRET when such a module is collected first).
import florence_kernels  # noqa: E402, F401

RUN_EXTENDED = os.environ.get("FLORENCE_RUN_EXTENDED_TESTS", "0") == "1"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available (run benchmarks/gpu_check.sh on one)")
    no_ext = pytest.mark.skip(reason="long sweep: set FLORENCE_RUN_EXTENDED_TESTS=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "extended" in item.keywords and not RUN_EXTENDED:
            item.add_marker(no_ext)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def runnable_backends(op_name: str, device: str) -> list[str]:
    """Backends of an op that can run on `device` in this process (the interpreter counts for triton on CPU)."""
    import florence_kernels as fk

    op = fk.OPS[op_name]
    return [b for b, backend in op.backends.items() if not backend.environment_reasons(device)]


def requires(name: str):
    """Skip marker for a test that needs the optional package ``name`` (florence.optional: "open_clip",
    "deepspeed", "dali"), with the reason, install command included, where it is missing."""
    from florence.optional import missing

    reason = missing(name)
    return pytest.mark.skipif(reason is not None, reason=f"optional package missing: {reason}")


# --- florence.train in a subprocess (the task tests) ------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(args: list[str], out, nproc: int = 1, port_base: int = 29600):
    """``python -m florence.train --set output_dir=<out> <args>`` from the repository root, under torchrun with
    ``nproc`` CPU ranks (gloo; master port ``port_base`` + pid % 1000) when nproc > 1; asserts exit 0 (showing the
    output's tail) and returns the CompletedProcess."""
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port_base + os.getpid() % 1000)] if nproc > 1 else [sys.executable]  # fmt: skip
    cmd = launcher + ["-m", "florence.train", "--set", f"output_dir={out}"] + list(args)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def build_image_shards(root) -> None:
    """The built-in digits at 32 px under ``root/digits`` and their curated shards under ``root/image_shards`` (what
    a pretraining checkpoint for the task tests trains on)."""
    from florence.data import builtin, curate

    builtin.build_digits(str(root / "digits"), size=32)
    curate.main(["--input", str(root / "digits" / "train.jsonl"), "--out", str(root / "image_shards"), "--min-size",
                 "8", "--near-dup-threshold", "-1", "--shard-size", "512", "--quiet"])  # fmt: skip


def pretrain_zero_steps(root, out, zero_stage: int = 0) -> None:
    """A pretraining run of 0 steps (florence_cpu_test, 32 px) on ``root/image_shards``: its checkpoint in ``out``
    holds the parameters the run was built with."""
    run_train([f"data.shards={root / 'image_shards'}", "data.eval=null", "data.image_size=32", "data.loader=torch",
               "data.num_workers=0", "model=florence_cpu_test", "model_overrides.vision.drop_path_rate=0.0",
               "batch_size=16", "precision=fp32", f"zero_stage={zero_stage}", "steps=0"], out)  # fmt: skip


def make_tiny_roberta(folder, seed: int = 0) -> str:
    """A tiny RoBERTa in ``folder`` as transformers saves one (config.json, model.safetensors, the tokenizer's files):
    byte-level BPE without merges (each UTF-8 byte one token), hidden 32, 2 layers, 2 heads, 64 positions; random
    weights. What ``vqa.roberta`` and ``florence.models.roberta.load_roberta`` read, made here without a download."""
    import json

    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    os.makedirs(folder, exist_ok=True)
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    byte_chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]  # GPT-2's byte -> unicode map
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *byte_chars, "<mask>"])}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    RobertaTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2)  # fmt: skip
    torch.manual_seed(seed)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)
