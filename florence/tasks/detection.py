"""Task "detection": ATSS + Dynamic Head on the CoSwin pyramid (Florence section 3.2, the object adapter;
florence.models.detection), fine-tuned from a pretrained Florence's image tower (``init``) or from scratch.

Model: :class:`florence.models.detection.ATSSDetector` (``detection.fpn_channels``, ``detection.num_blocks``, the
inference settings), its CoSwin from ``init`` (``ATSSDetector.from_florence``) or freshly initialised from the vision
config of ``model``. Data: the curated detection shards (``florence.data.detection``: images and COCO boxes) read
by ``make_detection_loader`` (DALI's image decoder where it imports, else PIL), box-aware scale jitter
(``detection.scale_range``) and crop for training. Loss: ATSS's (focal, centerness-weighted GIoU x 2, centerness
BCE), normalised by the positives averaged over ranks; gradient accumulation in micro-batches of ``chunk_size``
images. Evaluation: the held-out images (``data.eval``: the folder with ``detection.eval_annotations``, a COCO
instances JSON, and its images) at the test scale ``detection.eval_size`` (default ``data.image_size``), detections
in COCO's results format (written to ``<output_dir>/detections.json`` by rank 0) and pycocotools' COCOeval:
AP@[.5:.95], AP50, AP75, APs, APm, APl.
"""

from __future__ import annotations

import json
import os

import torch

from . import Task, global_mean


class DetectionTask(Task):
    unit = "images"
    eval_key = "AP"
    requires = ("deepspeed", "pycocotools")

    def categories(self) -> list[dict]:
        """The COCO categories of the training shards (label k = categories[k])."""
        from florence.data.loader import load_manifest

        cats = load_manifest(self.cfg["data"]["shards"]).get("categories")
        if not cats:
            raise ValueError(f"data.shards: {self.cfg['data']['shards']}/manifest.json lists no categories (curate "
                             "detection data with python -m florence.data.detection curate)")  # fmt: skip
        return cats

    def _kwargs(self) -> dict:
        d = self.cfg["detection"]
        return {k: d[k] for k in ("fpn_channels", "num_blocks", "anchor_scale", "topk", "score_threshold",
                                  "pre_nms_top_n", "nms_threshold", "detections_per_image")}  # fmt: skip

    def build_model(self):
        from florence.models import get_config, load_florence
        from florence.models.detection import ATSSDetector

        cfg, d = self.cfg, self.cfg["detection"]
        num_classes = len(self.categories())
        vision = {} if d.get("drop_path_rate") is None else {"drop_path_rate": d["drop_path_rate"]}
        if cfg.get("init"):
            pretrained = load_florence(cfg["init"])
            return ATSSDetector.from_florence(pretrained, num_classes, vision, backend=cfg["backend"],
                                              **self._kwargs())  # fmt: skip
        base = get_config(cfg["model"])["vision"] | (cfg.get("model_overrides") or {}).get("vision", {}) | vision
        return ATSSDetector(base, num_classes, backend=cfg["backend"], **self._kwargs())

    def no_weight_decay(self, model):
        return model.no_weight_decay_names()

    def make_loader(self, rank, world, per_rank):
        from florence.data.detection import make_detection_loader

        cfg, d = self.cfg, self.cfg["data"]
        return make_detection_loader(d["shards"], per_rank, d["image_size"], rank=rank, world_size=world,
                                     seed=cfg["seed"], train=True, drop_last=True, backend=d["loader"],
                                     split="global_batch",
                                     scale_range=tuple(cfg["detection"]["scale_range"]))  # fmt: skip

    def train_step(self, engine, batch, chunk, autocast):
        module = engine.module if hasattr(engine, "module") else engine
        images = batch["images"].to(self.device)
        size = tuple(images.shape[-2:])
        total, n = torch.zeros((), device=self.device), images.shape[0]
        for i in range(0, n, chunk):
            with autocast():
                outputs = engine(images[i : i + chunk])
            boxes = [b.to(self.device) for b in batch["boxes"][i : i + chunk]]
            labels = [t.to(self.device) for t in batch["labels"][i : i + chunk]]
            losses = module.loss(tuple(o.float() for o in outputs), boxes, labels, size, num_pos_avg=global_mean)
            engine.backward(losses["loss"])  # DeepSpeed divides by the accumulation steps; the last micro-step steps
            engine.step()
            total += losses["loss"].detach() * min(chunk, n - i)
        return global_mean(total / n)

    def load_eval(self):
        from florence.data.detection import load_detection_eval_set

        d = self.cfg["data"]
        if not d.get("eval"):
            return None
        annotations = self.cfg["detection"]["eval_annotations"]
        return load_detection_eval_set(d["eval"], self.eval_size(), annotations=annotations, backend=d["loader"])

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        size = cfg["detection"].get("eval_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 32 or size % 32):
            raise ValueError(f"detection.eval_size: expected a positive multiple of 32 (the backbone's largest stride) "
                             f"or null, got {size!r}")  # fmt: skip

    def eval_size(self) -> int:
        """The test scale: ``detection.eval_size`` (held-out images resized so that their longer side is this many
        pixels, a multiple of 32), else ``data.image_size``. Detectors are commonly tested above their images'
        native size (COCO's ~640-px images at a shorter side of 800); small objects gain most. ValueError for a size
        that is not a positive multiple of 32 (also raised by ``check_config`` when the config loads)."""
        self.check_config(self.cfg)
        size = self.cfg["detection"].get("eval_size")
        return self.cfg["data"]["image_size"] if size is None else size

    @torch.no_grad()
    def evaluate(self, engine, eval_set, autocast):
        from florence.eval import coco_evaluate
        from florence.models.detection import coco_results

        module = engine.module if hasattr(engine, "module") else engine
        was_training = module.training
        module.eval()
        images = eval_set["images"]
        size, step = tuple(images.shape[-2:]), self.cfg["detection"]["eval_batch_size"]
        detections = []
        for i in range(0, len(images), step):
            with autocast():
                outputs = engine(images[i : i + step].to(self.device))
            detections += module.postprocess(outputs, size)
        module.train(was_training)
        cat_ids = [c["id"] for c in self.categories()]  # label k -> the training shards' k-th category
        results = coco_results(detections, eval_set["image_ids"].tolist(), eval_set["scales"].tolist(), cat_ids)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            from florence_kernels._io import atomic_write_text

            os.makedirs(self.cfg["output_dir"], exist_ok=True)
            atomic_write_text(os.path.join(self.cfg["output_dir"], "detections.json"), json.dumps(results) + "\n")
        return coco_evaluate(eval_set["annotations"], results)

    def report(self, final):
        if "AP" not in final:
            return []
        return [f"detection AP: {final['AP']:.3f}  AP50: {final['AP50']:.3f}  AP75: {final['AP75']:.3f}  "
                f"(APs {final['APs']:.3f}, APm {final['APm']:.3f}, APl {final['APl']:.3f})"]  # fmt: skip
