"""Task "video": Video CoSwin fine-tuned for video classification (Florence section 3.3, the temporal adapter).

The model is a :class:`florence.models.VideoClassifier`: Video CoSwin (inflated from the pretrained Florence named by
``init``, or freshly initialised from ``video_coswin_<size>`` of ``model`` without it) and an I3D head (average pool,
dropout, linear). Loss: cross-entropy with label smoothing (``video.label_smoothing``); gradient accumulation in
micro-batches of ``chunk_size`` clips (DeepSpeed's). Data: the curated video shards (``florence.data.video``) read by
``make_video_loader`` (DALI's video decoder where it imports, else PyAV): a random temporal crop of ``video.frames``
frames ``video.frame_stride`` apart and a random spatial crop for training; the held-out split's centre clips for
evaluation (``data.eval``: test.jsonl + classes.json).

Evaluation: top-1 / top-5 on the held-out clips, and top-1 on the same clips with their frames shuffled (one fixed
permutation): a model that reads motion loses there what a per-frame model would never have had.
``video.frame_mode: single`` is the single-frame baseline: every clip replaced by one of its frames repeated (a
random frame for training, the centre frame for evaluation), so the model sees appearance without motion.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from . import Task, global_mean

FRAME_MODES = ("clip", "single")
HEAD_INITS = ("zero_shot", "random")


def single_frame(videos: torch.Tensor, train: bool) -> torch.Tensor:
    """(B, 3, T, H, W) -> the same shape, every clip one of its frames repeated T times (random per clip from the
    global RNG when training, the centre frame otherwise)."""
    B, _, T = videos.shape[:3]
    idx = torch.randint(T, (B,)) if train else torch.full((B,), T // 2)
    frames = videos[torch.arange(B), :, idx.to(videos.device)]  # (B, 3, H, W)
    return frames.unsqueeze(2).expand(-1, -1, T, -1, -1).contiguous()


class VideoTask(Task):
    unit = "clips"
    eval_key = "top1"
    requires = ("deepspeed",)

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        v = cfg["video"]
        if v["head_init"] not in HEAD_INITS:
            raise ValueError(f"video.head_init: expected one of {HEAD_INITS}, got {v['head_init']!r}")
        if v["frame_mode"] not in FRAME_MODES:
            raise ValueError(f"video.frame_mode: expected one of {FRAME_MODES}, got {v['frame_mode']!r}")
        if not isinstance(v["frames"], int) or v["frames"] < 2:
            raise ValueError(f"video.frames: expected an int >= 2 (the stem's temporal kernel), got {v['frames']!r}")

    def num_classes(self) -> int:
        v, d = self.cfg["video"], self.cfg["data"]
        if v.get("num_classes"):
            return int(v["num_classes"])
        for folder in (d.get("eval"), d.get("shards")):
            path = os.path.join(folder or "", "classes.json")
            if folder and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return len(json.load(f)["classes"])
        raise ValueError("video.num_classes: not set and no classes.json in data.eval or data.shards")

    def build_model(self):
        from florence.models import VideoClassifier, VideoCoSwin, create_video_coswin, get_config, load_florence

        cfg, v = self.cfg, self.cfg["video"]
        kw = {"backend": cfg["backend"]}
        if v.get("drop_path_rate") is not None:
            kw["drop_path_rate"] = v["drop_path_rate"]
        if cfg.get("init"):
            pretrained = load_florence(cfg["init"])
            backbone = VideoCoSwin.from_image(pretrained.visual, window_size=v["window_size"], **kw)
            model = VideoClassifier(backbone, self.num_classes(), v["dropout"])
            if v["head_init"] == "zero_shot":
                self._zero_shot_head(model, pretrained)
            return model
        else:
            get_config(cfg["model"])  # the named image config must exist
            vision = (cfg.get("model_overrides") or {}).get("vision", {})
            if v["window_size"]:
                kw["window_size"] = v["window_size"]
            backbone = create_video_coswin("video_coswin_" + cfg["model"][len("florence_") :], **(vision | kw))
        return VideoClassifier(backbone, self.num_classes(), v["dropout"])

    def class_names(self) -> list[str]:
        for folder in (self.cfg["data"].get("eval"), self.cfg["data"].get("shards")):
            path = os.path.join(folder or "", "classes.json")
            if folder and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return list(json.load(f)["classes"])
        raise ValueError("video.head_init zero_shot: needs the class names (classes.json in data.eval or data.shards)")

    @torch.no_grad()
    def _zero_shot_head(self, model, pretrained) -> None:
        """The head as Florence's zero-shot classifier (LP-FT / WiSE-FT's start): row k = t_k P, with t_k the class's
        prompt-ensemble text embedding (florence.eval.zero_shot_classifier) and P the image projection, times
        exp(logit scale) / E|P f| over 32 training clips (f the pooled video feature), so the first logits are the
        zero-shot logits s cos(P f, t_k), plus the I3D head's random draw. Needs open_clip (the tokenizer)."""
        from florence.data.video import make_video_loader
        from florence.eval import zero_shot_classifier
        from florence.optional import require
        from florence.tokenizer import get_tokenizer

        require("open_clip", "video.head_init zero_shot (the text tower's tokenizer)")
        names = self.class_names()
        if len(names) != model.head.out_features:
            raise ValueError(f"video.num_classes: {model.head.out_features}, but classes.json names {len(names)}")
        pretrained.eval()
        text = zero_shot_classifier(pretrained, names, get_tokenizer(pretrained.text.context_length))
        weight = text @ pretrained.image_projection.weight.float()  # (K, C)
        d, v = self.cfg["data"], self.cfg["video"]
        loader = make_video_loader(d["shards"], 32, v["frames"], d["image_size"], train=False, drop_last=False,
                                   backend=_video_backend(d["loader"]), frame_stride=v["frame_stride"])  # fmt: skip
        videos = next(iter(loader))["videos"]
        was = model.training
        model.eval()
        feats = model.backbone.forward_features(self._input(videos, False).cpu())
        model.train(was)
        norm = (feats @ pretrained.image_projection.weight.float().T).norm(dim=-1).mean()
        # added to the I3D head's N(0, 0.01) draw: the 4 rows of one digit (one text, directions unknown to the text
        # tower) would otherwise be equal, and equal rows pass the features no gradient that tells them apart
        model.head.weight.add_(weight * pretrained.scale().float() / norm)
        model.head.bias.zero_()

    def make_loader(self, rank, world, per_rank):
        from florence.data.video import make_video_loader

        cfg, d, v = self.cfg, self.cfg["data"], self.cfg["video"]
        return make_video_loader(d["shards"], per_rank, v["frames"], d["image_size"], rank=rank, world_size=world,
                                 seed=cfg["seed"], train=True, drop_last=True, backend=_video_backend(d["loader"]),
                                 frame_stride=v["frame_stride"], split="global_batch")  # fmt: skip

    def _input(self, videos: torch.Tensor, train: bool) -> torch.Tensor:
        videos = videos.to(self.device)
        return single_frame(videos, train) if self.cfg["video"]["frame_mode"] == "single" else videos

    def train_step(self, engine, batch, chunk, autocast):
        videos, labels = self._input(batch["videos"], True), batch["labels"].to(self.device)
        smoothing, total = self.cfg["video"]["label_smoothing"], torch.zeros((), device=self.device)
        for vc, lc in zip(videos.split(chunk), labels.split(chunk), strict=True):
            with autocast():
                logits = engine(vc)
            loss = F.cross_entropy(logits.float(), lc, label_smoothing=smoothing)
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps; the last micro-step steps
            engine.step()
            total += loss.detach() * lc.shape[0]
        return global_mean(total / labels.shape[0])

    def load_eval(self):
        from florence.data.video import load_video_eval_set

        d, v = self.cfg["data"], self.cfg["video"]
        if not d.get("eval"):
            return None
        videos, labels, classes, *_ = load_video_eval_set(d["eval"], v["frames"], d["image_size"],
                                                           frame_stride=v["frame_stride"],
                                                           backend=_video_backend(d["loader"]))  # fmt: skip
        return videos, labels, classes

    @torch.no_grad()
    def evaluate(self, engine, eval_set, autocast):
        from florence.eval import topk_accuracy

        videos, labels, _ = eval_set
        module = engine.module if hasattr(engine, "module") else engine
        was_training = module.training
        module.eval()
        perm = torch.randperm(videos.shape[2], generator=torch.Generator().manual_seed(0))
        logits, shuffled = [], []
        for i in range(0, len(videos), 64):
            x = self._input(videos[i : i + 64], False)
            with autocast():
                logits.append(engine(x).float())
                shuffled.append(engine(x[:, :, perm]).float())
        module.train(was_training)
        labels = labels.to(self.device)
        out = topk_accuracy(torch.cat(logits), labels)
        out["top1_frames_shuffled"] = topk_accuracy(torch.cat(shuffled), labels, ks=(1,))["top1"]
        return out

    def report(self, final):
        if "top1" not in final:
            return []
        return [f"video top-1: {100 * final['top1']:.1f}%  top-5: {100 * final['top5']:.1f}%  "
                f"(frames shuffled: {100 * final['top1_frames_shuffled']:.1f}%)"]  # fmt: skip


def _video_backend(loader: str) -> str:
    """data.loader for clips: "auto" (DALI's decoder where it imports, else PyAV), "dali", or "pyav" ("torch", the
    image loader's name for the DALI-free path, means PyAV here)."""
    return {"torch": "pyav"}.get(loader, loader)
