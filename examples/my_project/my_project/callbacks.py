"""A callback of the project's own (docs/extending.md): stop once validation accuracy reaches a target."""

from __future__ import annotations

from dgtrain.callbacks import Callback


class StopAtAccuracy(Callback):
    def __init__(self, target: float = 0.95):
        self.target = target

    def on_eval_end(self, ctx, step, metrics):  # host values, once per evaluation
        if metrics.get("val/acc", 0.0) >= self.target:
            ctx.request_stop(f"val/acc reached {self.target}")  # status early_stopped, exit 0
