"""Scoring saved weights (`dgtrain eval RUN_DIR|CHECKPOINT [--split val|test]`, dgtrain/commands/eval.py):
rebuild the model from the stored, resolved config (dgtrain/runs.py) and score the validation split (carved
from the training data: what the run selected on) or the data's held-out test set (mnist, cifar10,
image_folder with data.test_root). The stored config passes the same `_target_` allow-list as a live one,
with one difference: its own `allowed_targets` are ignored (a file cannot widen the list); add your trusted
packages with `--allow-target`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError
from dgtrain.tasks import no_reduce


def evaluate_split(
    s: Any, autocast: Any, split: str, batches: int | None = None, reduce: Any = no_reduce
) -> dict[str, float]:
    """Metrics of `s.model` on one split of `s.data`: val/... for "val", test/... for "test". Several
    processes (`reduce`): each scores its shard of the split, as the validation loader is sharded."""
    import dataclasses

    from dgtrain.data import make_loader
    from dgtrain.train import evaluate

    if split == "val":
        return evaluate(s, autocast, batches, reduce)
    if s.data.test is None:
        raise DgtrainError(
            "--split test: this data has no held-out test set (mnist, cifar10 and image_folder with "
            "data.test_root have one); its validation split is all there is: use --split val."
        )
    vs = s.val_loader.batch_sampler
    loader = make_loader(
        s.data.test, vs.batch_size, shuffle=False, seed=0, pin_memory=s.device.type == "cuda",
        rank=vs.rank, world=vs.world,
    )  # fmt: skip
    metrics = evaluate(dataclasses.replace(s, val_loader=loader), autocast, batches, reduce)
    return {"test/" + k.split("/", 1)[1]: v for k, v in metrics.items()}


def evaluate_source(
    source: Path,
    device: str = "auto",
    batches: int | None = None,
    allow: tuple[str, ...] = (),
    split: str = "val",
) -> dict[str, Any]:
    import torch

    from dgtrain.runs import load_run
    from dgtrain.train import autocast_for, precision_of

    run = load_run(source, device, allow)
    s = run.setup
    with torch.no_grad():
        metrics = evaluate_split(s, autocast_for(s.device, precision_of(run.cfg)), split, batches)
    monitor = s.task.monitor if split == "val" else "test/" + s.task.monitor.split("/", 1)[1]
    examples = len(s.data.val if split == "val" else s.data.test)
    batch_size = s.val_loader.batch_sampler.batch_size
    return {
        "source": str(source),
        "weights": run.weights_name,
        "device": str(s.device),
        "split": split,
        "examples": examples,
        "scored": examples if batches is None else min(examples, batches * batch_size),  # --batches N
        "val_examples": len(s.data.val),
        "monitor": {"metric": monitor, "mode": s.task.mode, "value": metrics.get(monitor)},
        "metrics": metrics,
    }
