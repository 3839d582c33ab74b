"""Task "pretrain": Florence's UniCL image-text pretraining (the loop's original task; florence.train's docstring
describes the step: gradient cache, UniCL over the global batch, zero-shot and retrieval evaluation)."""

from __future__ import annotations

from . import Task


class PretrainTask(Task):
    unit = "images"
    eval_key = "zero_shot_top1"
    requires = ("deepspeed", "open_clip")

    def build_model(self):
        import florence
        from florence.models import load_florence, load_state_dict_strict

        cfg = self.cfg
        model = florence.create_model(cfg["model"], **cfg["model_overrides"], backend=cfg["backend"])
        if cfg.get("init"):
            load_state_dict_strict(model, load_florence(cfg["init"]).state_dict(), source=cfg["init"])
        self.context = model.text.context_length
        return model

    def wrap(self, model):
        from florence.train import TrainWrapper

        return TrainWrapper(model)

    def no_weight_decay(self, model):
        return model.no_weight_decay_names()

    def make_loader(self, rank, world, per_rank):
        from florence.data.loader import make_loader
        from florence.train import _loader_kind

        cfg, d = self.cfg, self.cfg["data"]
        kw = dict(rank=rank, world_size=world, seed=cfg["seed"], train=True, drop_last=True,
                  context_length=self.context)  # fmt: skip
        extra = {"split": "global_batch", "num_workers": d.get("num_workers", 1)}
        return make_loader(d["shards"], per_rank, d["image_size"], backend=d["loader"], **kw,
                           **(extra if _loader_kind(d["loader"]) == "torch" else {}))  # fmt: skip

    def train_step(self, engine, batch, chunk, autocast):
        from florence.train import train_step

        dev = self.device
        images, tokens, labels = batch["images"].to(dev), batch["tokens"].to(dev), batch["labels"].to(dev)
        return train_step(engine, images, tokens, labels, chunk, autocast, self.cfg["backend"])

    def load_eval(self):
        from florence.train import load_eval_set

        d = self.cfg["data"]
        return load_eval_set(d["eval"], d["image_size"]) if d.get("eval") else None

    def evaluate(self, engine, eval_set, autocast):
        from florence.train import evaluate

        return evaluate(engine, eval_set, self.context, autocast, self.device)

    def report(self, final):
        lines = []
        if "zero_shot_top1" in final:
            lines.append(f"zero-shot top-1: {100 * final['zero_shot_top1']:.1f}%  "
                         f"top-5: {100 * final['zero_shot_top5']:.1f}%")  # fmt: skip
        if "i2t_r1" in final:
            lines.append(f"retrieval recall@1 image->text {100 * final['i2t_r1']:.1f}%, "
                         f"text->image {100 * final['t2i_r1']:.1f}%")  # fmt: skip
        return lines
