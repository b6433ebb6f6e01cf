"""What differs between tasks: how a batch becomes a loss, and how the validation split is scored.

Evaluation keeps running sums on the device and brings them to the host once, at the end.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def no_reduce(values: list) -> list:
    """One process: a task's sums are the job's sums already (several: `Dist.sum_` adds them up)."""
    return values


def float_loss(loss_fn: Callable) -> Callable:
    """The training criterion: `loss_fn` on float32 predictions (under autocast a model returns bf16 or
    fp16 ones), so every loss is computed and reduced in float32. With trainer.compile the loop compiles
    this whole function, so the cast is fused into the loss instead of writing a float32 copy of the
    predictions (for an LM, of every logit)."""

    def criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(pred.float(), target)

    return criterion


class Task:
    name = ""
    monitor = "val/loss"  # the validation metric that decides "best" and is the sweep objective
    mode = "min"

    def units(self, batch) -> torch.Tensor | int | None:
        """Tokens in a batch: a device tensor or a host int, never a host sync (None: not a sequence task)."""
        return None

    def outputs(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What the training loss compares: the model's predictions for `batch` and their targets."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, loss_fn: Callable) -> torch.Tensor:
        """The training loss of `batch`: `loss_fn` on the predictions in float32 (`float_loss`)."""
        return float_loss(loss_fn)(*self.outputs(model, batch))

    def evaluate(
        self, model: nn.Module, batches: Iterable, loss_fn: Callable, autocast, reduce: Callable = no_reduce
    ) -> dict[str, float]:
        """Metrics over `batches`. `reduce` (several processes, each scoring its shard of the split): sums
        a list of per-rank sums over the ranks (`Dist.sum_`); metrics are then ratios of job-wide sums."""
        raise NotImplementedError

    def configure_metrics(self, names: list[str], num_classes: int) -> None:
        """Extra validation metrics (`metrics=[...]`); only classification has any."""
        if names:
            from dgtrain.errors import DgtrainError

            raise DgtrainError(
                f"metrics={list(names)}: extra metrics exist for classification data only "
                f"(this is {self.name} data); use metrics=[]."
            )

    def summary(self) -> dict[str, Any]:
        """What the task adds to summary.json at the end of a run."""
        return {}


class _InputTarget(Task):
    """Tasks whose batches are (inputs, targets) and whose model output meets the loss directly."""

    def outputs(self, model, batch):
        x, y = batch
        return model(x), y


class Regression(_InputTarget):
    name, monitor, mode = "regression", "val/mse", "min"

    @torch.no_grad()
    def evaluate(self, model, batches, loss_fn, autocast=contextlib.nullcontext, reduce=no_reduce):
        n, loss_sum, sse, y_sum, y_sq = 0, 0.0, 0.0, 0.0, 0.0
        for x, y in batches:
            with autocast():
                pred = model(x).float()
            loss_sum = loss_sum + loss_fn(pred, y) * len(y)
            sse = sse + (pred - y).pow(2).sum()
            y_sum, y_sq = y_sum + y.sum(0), y_sq + y.pow(2).sum(0)
            n += len(y)
        # several processes: the job's sums
        loss_sum, sse, y_sum, y_sq, n = reduce([loss_sum, sse, y_sum, y_sq, n])
        sst = (y_sq - y_sum.pow(2) / n).sum()  # sum of squares about the validation mean
        loss, sse, sst, sq = (float(t) for t in (loss_sum, sse, sst, y_sq.sum()))
        return {
            "val/loss": loss / n,
            "val/mse": sse / (n * y_sum.numel()),
            "val/r2": r2_score(sse, sst, sq),
        }


def r2_score(sse: float, sst: float, sum_sq: float) -> float:
    """1 - SSE/SST. Targets that do not vary (one example, a constant column: SST is zero, or float noise
    below 1e-6 of the sum of squares it was computed from) leave it undefined; as scikit-learn's r2_score
    does, that gives 1.0 for exact predictions and 0.0 otherwise, never a huge negative number."""
    if sst <= 1e-6 * sum_sq:
        return 1.0 if sse == 0.0 else 0.0
    return 1.0 - sse / sst


METRIC_NAMES = "top<k> (top-k accuracy, e.g. top5), f1 (macro F1), confusion (confusion matrix PNG)"


class Classification(_InputTarget):
    name, monitor, mode = "classification", "val/acc", "max"

    def __init__(self):
        self.metric_names: list[str] = []
        self.num_classes = 0
        self.confusion: list[list[int]] | None = None  # of the latest evaluation

    def configure_metrics(self, names: list[str], num_classes: int) -> None:
        from dgtrain.errors import DgtrainError

        for n in names:
            k = re.fullmatch(r"top(\d+)", n)
            if not (n in ("f1", "confusion") or k):
                raise DgtrainError(f"metrics: unknown metric {n!r}; the choices are {METRIC_NAMES}.")
            if k and not 2 <= int(k.group(1)) <= num_classes:
                raise DgtrainError(
                    f"metrics: {n} needs 2 <= k <= the number of classes ({num_classes}); top1 is val/acc."
                )
        if names:
            try:
                import torchmetrics  # noqa: F401
            except ImportError as e:
                raise DgtrainError(
                    f"metrics={list(names)} needs torchmetrics, which is not installed ({e}): "
                    "pip install 'dgtrain[metrics]' (or use metrics=[])."
                ) from e
        self.metric_names, self.num_classes = list(names), num_classes

    def _metrics(self, device: torch.device) -> dict[str, Any]:
        """torchmetrics objects on the logits' device; `validate_args=False` keeps `update` free of the
        checks that would bring values to the host, so each batch only queues device work."""
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
        )

        c, out = self.num_classes, {}
        for n in self.metric_names:
            if n == "f1":
                out["val/f1_macro"] = MulticlassF1Score(c, average="macro", validate_args=False)
            elif n == "confusion":
                out["confusion"] = MulticlassConfusionMatrix(c, validate_args=False)
            else:
                k = int(n[3:])
                out[f"val/acc_top{k}"] = MulticlassAccuracy(c, top_k=k, average="micro", validate_args=False)
        return {k: m.to(device) for k, m in out.items()}

    @torch.no_grad()
    def evaluate(self, model, batches, loss_fn, autocast=contextlib.nullcontext, reduce=no_reduce):
        n, loss_sum, correct = 0, 0.0, 0
        extra: dict[str, Any] | None = None
        for x, y in batches:
            with autocast():
                logits = model(x).float()
            loss_sum = loss_sum + loss_fn(logits, y) * len(y)
            correct = correct + (logits.argmax(-1) == y).sum()
            n += len(y)
            if self.metric_names:
                extra = extra if extra is not None else self._metrics(logits.device)
                for m in extra.values():
                    m.update(logits, y)
        # several processes: the job's sums (torchmetrics syncs its own states)
        loss_sum, correct, n = reduce([loss_sum, correct, n])
        out = {"val/loss": float(loss_sum) / n, "val/acc": float(correct) / n}
        for name, m in (extra or {}).items():  # computed once, at the end: one transfer each
            if name == "confusion":
                self.confusion = m.compute().cpu().tolist()
            else:
                out[name] = float(m.compute())
        return out

    def summary(self) -> dict[str, Any]:
        return {"confusion_matrix": self.confusion} if self.confusion is not None else {}


class Seq2Seq(Task):
    """Teacher forcing in training (the decoder sees the true previous token); greedy decoding in
    evaluation, so val/acc is the token accuracy of what the model really generates."""

    name, monitor, mode = "seq2seq", "val/acc", "max"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def units(self, batch):
        return (batch[1][:, 1:] != self.pad_id).sum()

    def outputs(self, model, batch):
        src, tgt = batch
        return model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten()

    @torch.no_grad()
    def evaluate(self, model, batches, loss_fn, autocast=contextlib.nullcontext, reduce=no_reduce):
        tokens, loss_sum, correct, seq_correct, n_seq = 0, 0.0, 0, 0, 0
        for src, tgt in batches:
            target = tgt[:, 1:]
            real = target != self.pad_id
            n_tok = real.sum()
            with autocast():
                logits = model(src, tgt[:, :-1]).float()
                generated = model.generate(src, max_len=target.shape[1])
            loss_sum = loss_sum + loss_fn(logits.flatten(0, 1), target.flatten()) * n_tok
            pred = torch.full_like(target, self.pad_id)
            width = min(generated.shape[1], target.shape[1])
            pred[:, :width] = generated[:, :width]
            hit = (pred == target) & real
            correct = correct + hit.sum()
            seq_correct = seq_correct + (hit | ~real).all(dim=1).sum()
            tokens = tokens + n_tok
            n_seq += len(src)
        # several processes: the job's sums
        loss_sum, correct, seq_correct, tokens, n_seq = reduce(
            [loss_sum, correct, seq_correct, tokens, n_seq]
        )
        tokens = float(tokens)
        return {
            "val/loss": float(loss_sum) / tokens,
            "val/acc": float(correct) / tokens,
            "val/seq_acc": float(seq_correct) / n_seq,
        }


class LanguageModel(Task):
    name, monitor, mode = "lm", "val/ppl", "min"

    def units(self, batch):
        return batch[1].numel()  # a host int: known from the shape, no device work

    def outputs(self, model, batch):
        x, y = batch
        return model(x).flatten(0, 1), y.flatten()

    @torch.no_grad()
    def evaluate(self, model, batches, loss_fn, autocast=contextlib.nullcontext, reduce=no_reduce):
        tokens, loss_sum = 0, 0.0
        for x, y in batches:
            with autocast():
                logits = model(x).float()
            loss_sum = loss_sum + loss_fn(logits.flatten(0, 1), y.flatten()) * y.numel()
            tokens += y.numel()
        loss_sum, tokens = reduce([loss_sum, tokens])  # several processes: the job's sums
        loss = float(loss_sum) / tokens
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


def make_task(name: str, pad_id: int | None = None) -> Task:
    if name == "seq2seq":
        return Seq2Seq(pad_id if pad_id is not None else -100)
    return {"regression": Regression, "classification": Classification, "lm": LanguageModel}[name]()


# Which direction is better, for every validation metric any task reports.
HIGHER_IS_BETTER = {
    "val/acc": True,
    "val/seq_acc": True,
    "val/r2": True,
    "val/loss": False,
    "val/mse": False,
    "val/ppl": False,
    "val/f1_macro": True,
    **{f"val/acc_top{k}": True for k in range(2, 101)},
}
