"""Tasks of ``florence.train``: one loop (config, DeepSpeed ZeRO, precision, activation checkpointing, schedule,
checkpoints and exact resume, progress, metrics, curves, evaluation) and, per task, what differs: the model, the
loader, the loss and the evaluator.

A task is a :class:`Task` subclass registered in TASKS under its config name (``task: video``). The loop calls, in
order: ``build_model()`` (``cfg["init"]``, when set, names a pretrained Florence to start from), ``wrap(model)`` (the
module DeepSpeed wraps), ``no_weight_decay(model)``, ``make_loader(rank, world, per_rank)``, ``load_eval()``, then
``train_step`` per step and ``evaluate`` at every eval interval and at the end; ``report(final)`` gives the lines the
launcher prints. Built in: "pretrain" (UniCL image-text pretraining, florence.tasks.pretrain), "video" (Video CoSwin
fine-tuned for video classification, florence.tasks.video), "detection" (ATSS + Dynamic Head on the CoSwin pyramid
with COCO evaluation, florence.tasks.detection) and "vqa" (METER's co-attention fusion on both towers with VQA
accuracy, florence.tasks.vqa).
"""

from __future__ import annotations

import importlib

import torch

TASKS = {
    "pretrain": "florence.tasks.pretrain:PretrainTask",
    "video": "florence.tasks.video:VideoTask",
    "detection": "florence.tasks.detection:DetectionTask",
    "vqa": "florence.tasks.vqa:VQATask",
}


def get_task(name: str) -> type[Task]:
    """The Task class registered as ``name``; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class Task:
    """What one task supplies to the training loop (see the module docstring for the call order).

    Attributes: ``unit`` (what batch_size counts: "images", "clips"; the throughput is logged as ``<unit>_per_s``),
    ``eval_key`` (the headline evaluation metric, drawn on the loss curve), ``requires`` (optional packages the task
    needs, checked before any process starts: florence.optional names).
    """

    unit = "images"
    eval_key = "top1"
    requires: tuple[str, ...] = ("deepspeed",)

    def __init__(self, cfg: dict, device: str):
        self.cfg, self.device = cfg, device

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Checks of the task's own config keys at load time (before any process group, model or data): ValueError
        naming the key. None by default."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module DeepSpeed wraps (its forward is what ``engine(...)`` calls); the model itself by default."""
        return model

    def lr_multipliers(self) -> dict:
        """The learning-rate factors per parameter-name prefix (``optimizer.lr_multipliers``: their values are checked
        when the config loads, their prefixes against the model's parameters in ``build_engine``); a task whose model
        leaves out a module of its config's multipliers drops that prefix here."""
        return dict(self.cfg["optimizer"].get("lr_multipliers") or {})

    def no_weight_decay(self, model: torch.nn.Module) -> set[str]:
        """Names (in ``model``) of parameters AdamW does not decay: norms, biases, position tables by default."""
        return {n for n, p in model.named_parameters() if p.dim() <= 1 or "relative_position_bias_table" in n}

    def make_loader(self, rank: int, world: int, per_rank: int):
        raise NotImplementedError

    def train_step(self, engine, batch: dict, chunk: int, autocast) -> torch.Tensor:
        """One optimizer step on this rank's batch; the whole (all-rank) batch's mean loss, detached."""
        raise NotImplementedError

    def load_eval(self):
        return None

    def evaluate(self, engine, eval_set, autocast) -> dict:
        return {}

    def report(self, final: dict) -> list[str]:
        return []


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all ranks (x itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x
