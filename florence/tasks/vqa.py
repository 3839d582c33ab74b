"""Task "vqa": METER's co-attention fusion on Florence's towers (Florence section 3.3, the vision-language adapter;
florence.models.meter) fine-tuned for visual question answering, from a pretrained Florence (``init``: both towers)
or from scratch; ``vqa.question_only`` trains the question-only baseline (no image tower). ``vqa.roberta`` (a local
transformers folder) puts RoBERTa, METER's own text encoder, in place of Florence's text tower (its weights from the
folder, the questions through its tokenizer at ``vqa.max_text_len`` tokens; the image tower still from ``init``).

Model: :class:`florence.models.METER` (``vqa.width``, ``heads``, ``layers``, ``mlp_ratio``, ``dropout``), the
towers' configs from ``model`` (or from ``init``). Data: the curated VQA shards (``florence.data.vqa``: one sample
per question; images resized to ``data.image_size``, questions tokenized to the text tower's context) read by
``make_vqa_loader`` (DALI's image decoder where it imports, else PIL); the answer vocabulary is the shards'
manifest's (built from the training split). Loss: METER's (binary cross-entropy on VQA's soft scores x the number
of answers, :func:`florence.models.meter.vqa_loss`), gradient accumulation in micro-batches of ``chunk_size``.
Evaluation: the held-out questions (``data.eval``: the folder with ``vqa.eval_annotations`` in VQA's format and its
images), the answer with the highest logit, VQA accuracy (min(matching human answers / 3, 1)) overall
("accuracy") and per question type ("accuracy_<type>"); predictions in VQA's results format ([{"question_id",
"answer"}]) written to ``<output_dir>/predictions.json`` by rank 0.
"""

from __future__ import annotations

import json
import os
import re

import torch

from . import Task, global_mean

IMAGE_SIDE = ("visual", "image_")  # METER's modules that the question-only model leaves out ...
CROSS_PARTS = re.compile(r"^text_layers\.(\d+\.)?(cross_attn|ln2)(\.|$)")  # ... and its text layers' cross parts


def _images_of(images, image_index, question_only, device):
    """(the images a slice of questions asks about, each once; each question's row among them), on ``device``;
    (None, None) for the question-only model."""
    if question_only:
        return None, None
    unique, rows = torch.unique(image_index, return_inverse=True)
    return images[unique].to(device), rows.to(device)


class VQATask(Task):
    unit = "samples"
    eval_key = "accuracy"
    requires = ("deepspeed",)

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        from florence.train import DEFAULTS

        v = cfg.get("vqa")
        if not isinstance(v, dict):
            raise ValueError(f"vqa: expected a mapping of the fusion's settings, got {v!r}")
        unknown = sorted(set(v) - set(DEFAULTS["vqa"]))
        if unknown:
            raise ValueError(f"vqa: unknown keys {unknown} (known: {sorted(DEFAULTS['vqa'])})")
        for key, low in (("width", 4), ("heads", 1), ("layers", 0), ("eval_batch_size", 1)):
            value = v.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"vqa.{key}: expected an int >= {low}, got {value!r}")
        if v["width"] % 4 or v["width"] % v["heads"]:
            raise ValueError(f"vqa.width: {v['width']} must be a multiple of 4 (the 2D position embedding) and of "
                             f"vqa.heads ({v['heads']})")  # fmt: skip
        for key in ("dropout", "drop_path_rate"):
            value = v.get(key)
            if value is None and key == "drop_path_rate":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"vqa.{key}: expected a probability in [0, 1), got {value!r}")
        if not isinstance(v.get("mlp_ratio"), (int, float)) or isinstance(v["mlp_ratio"], bool) or v["mlp_ratio"] <= 0:
            raise ValueError(f"vqa.mlp_ratio: expected a positive number, got {v.get('mlp_ratio')!r}")
        if not isinstance(v.get("question_only"), bool):
            raise ValueError(f"vqa.question_only: expected true or false, got {v.get('question_only')!r}")
        if v.get("roberta") is not None and (not isinstance(v["roberta"], str) or not v["roberta"]):
            raise ValueError(f"vqa.roberta: expected null or the path of a local RoBERTa folder, got {v['roberta']!r}")
        if v.get("attn_backend") == "flash_attn" and cfg.get("precision") not in ("bf16", "fp16"):
            raise ValueError(f"vqa.attn_backend: flash_attn runs in half precision; precision is "
                             f"{cfg.get('precision')!r} (set bf16 or fp16)")  # fmt: skip
        from florence.models.text import ATTN_BACKENDS

        if v.get("attn_backend") not in ATTN_BACKENDS:
            raise ValueError(f"vqa.attn_backend: expected one of {ATTN_BACKENDS}, got {v.get('attn_backend')!r}")
        value = v.get("max_text_len")
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"vqa.max_text_len: expected an int >= 2 (RoBERTa's <s> and </s>), got {value!r}")

    def answers(self) -> list[str]:
        """The answer vocabulary of the training shards (logit k = answers[k])."""
        from florence.data.loader import load_manifest

        answers = load_manifest(self.cfg["data"]["shards"]).get("answers")
        if not answers:
            raise ValueError(f"data.shards: {self.cfg['data']['shards']}/manifest.json lists no answers (curate VQA "
                             "data with python -m florence.data.vqa curate)")  # fmt: skip
        return list(answers)

    def _kwargs(self) -> dict:
        v = self.cfg["vqa"]
        kw = {k: v[k] for k in ("width", "heads", "layers", "mlp_ratio", "dropout", "question_only", "attn_backend")}
        return kw | {"itm": False, "backend": self.cfg["backend"]}

    def _context_length(self) -> int:
        from florence.models import get_config

        if self.cfg["vqa"]["roberta"]:
            return self.cfg["vqa"]["max_text_len"]
        return int(get_config(self.cfg["model"])["text"]["context_length"])

    def _tokenizer(self):
        """None (CLIP's BPE, Florence's text tower) or the RoBERTa folder's ``RobertaTokens``."""
        if not self.cfg["vqa"]["roberta"]:
            return None
        from florence.models.roberta import RobertaTokens

        return RobertaTokens(self.cfg["vqa"]["roberta"], self.cfg["vqa"]["max_text_len"])

    def build_model(self):
        from florence.models import METER, get_config, load_florence

        cfg, v = self.cfg, self.cfg["vqa"]
        vision = {} if v.get("drop_path_rate") is None else {"drop_path_rate": v["drop_path_rate"]}
        num_answers = len(self.answers())
        base = get_config(cfg["model"])
        overrides = cfg.get("model_overrides") or {}
        if v["roberta"]:
            from florence.models.roberta import load_roberta

            try:
                stream, _ = load_roberta(v["roberta"], v["max_text_len"])
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"vqa.roberta: {e}") from e
            florence = load_florence(cfg["init"]) if cfg.get("init") and not v["question_only"] else None
            if florence is None:
                vision = base["vision"] | overrides.get("vision", {}) | vision
            return METER.from_florence(florence, num_answers, vision, roberta=stream, **self._kwargs())
        if cfg.get("init"):
            return METER.from_florence(load_florence(cfg["init"]), num_answers, vision, **self._kwargs())
        return METER(base["vision"] | overrides.get("vision", {}) | vision, base["text"] | overrides.get("text", {}),
                     num_answers, **self._kwargs())  # fmt: skip

    def lr_multipliers(self) -> dict:
        """``optimizer.lr_multipliers``; the question-only model has no image tower, image stream or cross-attention,
        so its run drops the prefixes of those (starting with ``visual`` or ``image_``, or naming a text layer's
        ``cross_attn`` or ``ln2``): one config serves the three runs."""
        multipliers = super().lr_multipliers()
        if self.cfg["vqa"]["question_only"]:
            multipliers = {k: v for k, v in multipliers.items()
                           if not k.startswith(IMAGE_SIDE) and not CROSS_PARTS.search(k)}  # fmt: skip
        return multipliers

    def no_weight_decay(self, model):
        return model.no_weight_decay_names()

    def make_loader(self, rank, world, per_rank):
        from florence.data.vqa import make_vqa_loader

        cfg, d = self.cfg, self.cfg["data"]
        return make_vqa_loader(d["shards"], per_rank, d["image_size"], rank=rank, world_size=world, seed=cfg["seed"],
                               train=True, drop_last=True, backend=d["loader"], split="global_batch",
                               context_length=self._context_length(), tokenizer=self._tokenizer(),
                               decode_images=not cfg["vqa"]["question_only"])  # fmt: skip

    def train_step(self, engine, batch, chunk, autocast):
        from florence.models.meter import vqa_loss

        question_only = self.cfg["vqa"]["question_only"]
        tokens, targets = batch["tokens"].to(self.device), batch["targets"].to(self.device)
        total, n = torch.zeros((), device=self.device), tokens.shape[0]
        for i in range(0, n, chunk):
            images, index = _images_of(batch["images"], batch["image_index"][i : i + chunk], question_only, self.device)
            with autocast():
                out = engine(images, tokens[i : i + chunk], index)
            loss = vqa_loss(out["vqa_logits"].float(), targets[i : i + chunk])
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps; the last micro-step steps
            engine.step()
            total += loss.detach() * min(chunk, n - i)
        return global_mean(total / n)

    def load_eval(self):
        from florence.data.vqa import load_vqa_eval_set

        d = self.cfg["data"]
        if not d.get("eval"):
            return None
        return load_vqa_eval_set(d["eval"], d["image_size"], annotations=self.cfg["vqa"]["eval_annotations"],
                                 answer_vocab=self.answers(), backend=d["loader"],
                                 context_length=self._context_length(), tokenizer=self._tokenizer())  # fmt: skip

    @torch.no_grad()
    def evaluate(self, engine, eval_set, autocast):
        from florence.data.vqa import vqa_report

        module = engine.module if hasattr(engine, "module") else engine
        was_training = module.training
        module.eval()
        answers, step = self.answers(), self.cfg["vqa"]["eval_batch_size"]
        question_only = self.cfg["vqa"]["question_only"]
        tokens, index = eval_set["tokens"], eval_set["image_index"]
        predictions = []
        for i in range(0, len(tokens), step):
            images, rows = _images_of(eval_set["images"], index[i : i + step], question_only, self.device)
            with autocast():
                logits = engine(images, tokens[i : i + step].to(self.device), rows)["vqa_logits"]
            predictions += [answers[k] for k in logits.float().argmax(dim=-1).tolist()]
        module.train(was_training)
        report = vqa_report(predictions, eval_set["answers"], eval_set["question_types"])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            from florence_kernels._io import atomic_write_text

            results = [{"question_id": int(q), "answer": a}
                       for q, a in zip(eval_set["question_ids"].tolist(), predictions, strict=True)]  # fmt: skip
            os.makedirs(self.cfg["output_dir"], exist_ok=True)
            atomic_write_text(os.path.join(self.cfg["output_dir"], "predictions.json"), json.dumps(results) + "\n")
        scores = {"accuracy": report["accuracy"]}
        scores.update({f"accuracy_{t}": a for t, a in report["per_type"].items()})
        return scores

    def report(self, final):
        if "accuracy" not in final:
            return []
        per_type = ", ".join(f"{k[len('accuracy_') :]} {100 * v:.1f}%" for k, v in final.items()
                             if k.startswith("accuracy_"))  # fmt: skip
        return [f"vqa accuracy: {100 * final['accuracy']:.1f}% ({per_type})"]
