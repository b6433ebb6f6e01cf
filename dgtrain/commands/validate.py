"""`dgtrain validate [NAME ...] [key=value ...]`: compose and instantiate recipes without training.

For each recipe (all by default) it gathers every problem it can find, rather than stopping at the
first: the first line is the command that runs it; the config composes (unknown keys, options and
bad values are Hydra's errors); the cross-field checks of dgtrain.validation pass (model <-> data
task, loss, trainer settings, `_target_` allow-list); the smoke contract is usable and its overrides
compose; and the objects can be built. Building happens at the smoke size: the data is built on the
CPU, the model, optimizer and schedule on the meta device (no memory, no compute), and one batch goes
through the model and loss on the meta device, so shape mismatches surface too. Data read from files
(mnist, cifar10) that are absent is reported as such and not built; that alone is not an error.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from omegaconf import DictConfig


@dataclass
class Report:
    recipe: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def instantiate(cfg: DictConfig) -> list[str]:
    """Build data, task, model (meta device), loss, optimizer and schedule; push one batch through."""
    import torch

    from dgtrain.config import allowed_prefixes, build
    from dgtrain.data import make_loader
    from dgtrain.losses import build_loss
    from dgtrain.optim import make_optimizer
    from dgtrain.tasks import make_task
    from dgtrain.train import build_data, build_model

    allowed = allowed_prefixes(cfg)
    try:
        data = build_data(cfg, allowed)
        if data.info.task != str(cfg.data.task):
            return [f"data.task={cfg.data.task} but the data builder returned {data.info.task} data."]
        task = make_task(data.info.task, data.info.pad_id)
        with torch.device("meta"):
            model = build_model(cfg, data.info, allowed)
        loss_fn = build_loss(cfg.loss, allowed, data.info.task, data.info.pad_id)
        optimizer = make_optimizer(cfg, model, allowed)
        build(cfg.scheduler, allowed=allowed, key="scheduler")(optimizer, total_steps=1)
        loader = make_loader(
            data.train, int(cfg.data.batch_size), shuffle=False, seed=cfg.seed, num_workers=0
        )
        batch = tuple(t.to("meta") for t in next(iter(loader)))
        loss = task.loss(model, batch, loss_fn)
        if loss.dim() != 0:
            return [f"the loss of one batch has shape {tuple(loss.shape)}; expected a scalar."]
    except Exception as e:  # noqa: BLE001 - report whatever breaks construction, with its type
        return [f"instantiating failed: {type(e).__name__}: {_one_line(e)}"]
    return []


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def validate_recipe(name: str, overrides: list[str], build_objects: bool = True) -> Report:
    from dgtrain.commands.smoke import contract_problems
    from dgtrain.recipes import compose, find_recipe, load_recipe, missing_data_files
    from dgtrain.validation import problems

    report = Report(name)
    recipe = find_recipe(name)
    expected = f"dgtrain recipe={name}"
    if not (recipe.command == expected or recipe.command.startswith(expected + " ")):
        report.problems.append(
            f"{recipe.path.name}: the first line must be the command that runs it, `# {expected}` "
            f"(found `# {recipe.command}`)."
        )
    if not recipe.description:
        report.problems.append(
            f"{recipe.path.name}: add a one-line description as a comment after the command."
        )
    try:
        load_recipe(recipe.path)
    except Exception as e:  # noqa: BLE001
        report.problems.append(_one_line(e))
        return report
    try:
        cfg, choices = compose([f"recipe={name}", *overrides])
    except Exception as e:  # noqa: BLE001 - Hydra's message names the key or option
        report.problems.append(f"does not compose: {_one_line(e)}")
        return report
    report.problems += problems(cfg, choices)
    report.problems += contract_problems(cfg.smoke)
    try:
        smoke_cfg, smoke_choices = compose(
            [f"recipe={name}", *[str(x) for x in cfg.smoke.overrides], *overrides]
        )
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"smoke.overrides do not compose: {_one_line(e)}")
        return report
    report.problems += [
        f"with smoke.overrides: {p}" for p in problems(smoke_cfg, smoke_choices) if p not in report.problems
    ]
    if str(cfg.device).startswith("cuda"):
        report.notes.append(
            f"runs on device={cfg.device} (precision={getattr(cfg.precision, 'value', cfg.precision)})"
        )
    missing = missing_data_files(smoke_cfg)
    if missing:
        report.notes.append(f"data files absent, data not built: {missing}")
    elif build_objects and not report.problems:
        report.problems += instantiate(smoke_cfg)
    return report


def main(argv: list[str]) -> int:
    from dgtrain.recipes import select

    parser = argparse.ArgumentParser(
        prog="dgtrain validate",
        description="Compose and instantiate recipes (all by default) without training; report every problem. "
        "key=value arguments apply to every recipe.",
    )
    parser.add_argument("items", nargs="*", metavar="NAME | key=value")
    args = parser.parse_args(argv)
    recipes, overrides = select(args.items)
    bad = 0
    for r in recipes:
        report = validate_recipe(r.name, overrides)
        bad += bool(report.problems)
        print(f"{'ok     ' if not report.problems else 'INVALID'} {r.name}")
        for p in report.problems:
            print(f"    - {p}")
        for n in report.notes:
            print(f"    note: {n}")
    print(f"{len(recipes) - bad} of {len(recipes)} recipe(s) valid" + (f"; {bad} invalid" if bad else ""))
    return 1 if bad else 0
