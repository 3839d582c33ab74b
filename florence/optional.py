"""Optional packages: what needs each, how to install it, and one clear error where it is absent.

florence_kernels needs torch, einops and numpy only. Seven parts of florence need a package that the GPU machine we
target (torch 2.11, triton 3.6; see requirements-gpu-machine.txt) does not have:

- ``open_clip``: CLIP's BPE tokenizer (``florence.Tokenizer``), hence curation (it counts BPE tokens to fit captions
  into the text context), the data loaders (they tokenize captions) and zero-shot evaluation. We use open_clip's
  ``SimpleTokenizer`` rather than a BPE of our own: the vocabulary and merges (CLIP's ``bpe_simple_vocab_16e6``)
  ship inside its wheel, with ftfy's text repair and regex's Unicode classes, and ids equal to CLIP's are the
  point of the tokenizer; a copy would be code and data to keep in step with a well-kept library.
- ``deepspeed``: ``florence.train`` (its engine, ZeRO, checkpoints).
- ``dali``: ``DaliLoader`` (NVIDIA DALI's decoding and augmentation); ``make_loader(backend="auto")`` falls back to
  the PyTorch loader without it.
- ``av`` (PyAV): ``florence.data.video`` (writing clips, decoding any codec FFmpeg reads, checking videos in
  curation) and the built-in ``moving_digits`` variant, which it encodes as VP9.
- ``pyarrow`` and ``ray`` (Ray Data): Parquet input to curation, and curation's distributed engine
  (``--engine ray``, ``florence.data.curate_ray``); the local engine and the other inputs need neither.
- ``pycocotools``: COCO's detection evaluation (``florence.eval.coco_evaluate``, the detection task's AP); we use
  COCOeval itself rather than a reimplementation: its matching rules (crowd regions, area ranges, 101-point
  interpolation) are what every published COCO AP means.
- ``transformers``: RoBERTa as METER's text stream (``florence.models.roberta``, ``vqa.roberta``), the paper's text
  encoder, read from a local folder; Florence's own text tower needs nothing.

``missing(name)`` says why a package cannot be used (None when it can); ``require(name, who)`` imports it or raises
:class:`MissingOptionalDependency` (an ImportError) naming who needs it and the pinned install command. Tests skip
with that reason, benchmarks report it as a skip.
"""

from __future__ import annotations

import functools
import importlib

# name -> (module to import, pip requirement as pinned in requirements.txt, what it is used for)
PACKAGES = {
    "open_clip": ("open_clip", "open_clip_torch==3.3.0 ftfy==6.3.1 regex==2026.11.19",
                  "CLIP's BPE tokenizer (its vocabulary ships in open_clip's wheel)"),
    "deepspeed": ("deepspeed", "deepspeed==0.19.8", "florence.train's engine (ZeRO, mixed precision, checkpoints)"),
    "dali": ("nvidia.dali", "nvidia-dali-cuda130==2.4.0", "the DALI input pipeline"),
    "av": ("av", "av==18.0.0",
           "video files: PyAV's encoders (built-in clips) and decoders (any codec FFmpeg reads)"),
    "pycocotools": ("pycocotools.cocoeval", "pycocotools==2.0.11",
                    "COCO's detection evaluation (COCOeval: AP@[.5:.95], AP50, AP75, APs/m/l)"),
    "pyarrow": ("pyarrow.parquet", "pyarrow==26.0.1", "Parquet input to curation (crawl metadata)"),
    "ray": ("ray.data", "ray[data]==2.60.0 pyarrow==26.0.1 pandas==3.1.1",
            "curation's distributed engine (python -m florence.data.curate --engine ray)"),
    "transformers": ("transformers", "transformers==5.24.0 tokenizers==0.23.3",
                     "RoBERTa as METER's text stream, from a local folder (florence.models.roberta)"),
}  # fmt: skip


class MissingOptionalDependency(ImportError):
    """An optional package is not installed (or fails to import); the message names the install command."""


@functools.cache
def missing(name: str) -> str | None:
    """None when the optional package ``name`` (a PACKAGES key: "open_clip", "deepspeed", "dali", "av",
    "pycocotools", "pyarrow", "ray", "transformers") imports, else why it does not.

    Raises ValueError for an unknown name. The import is tried once per process (a broken install, e.g. DALI
    without its CUDA libraries, counts as missing, with its error in the reason).
    """
    if name not in PACKAGES:
        raise ValueError(f"name: {name!r} is not an optional package; known: {', '.join(PACKAGES)}")
    module, pip, purpose = PACKAGES[name]
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a library problem at import time
        return f"{module} is not importable ({type(e).__name__}: {e}); it provides {purpose}; pip install {pip}"
    return None


def require(name: str, who: str):
    """The imported module of optional package ``name``; :class:`MissingOptionalDependency` naming ``who`` needs it
    and how to install it where it is absent."""
    reason = missing(name)
    if reason is not None:
        raise MissingOptionalDependency(f"{who}: {reason}")
    return importlib.import_module(PACKAGES[name][0])
