"""`dgtrain [overrides]` trains (Hydra); `dgtrain <subcommand> ...` runs one of the tools below.

Heavy imports (torch, the training code) happen only once a command needs them. `--help`, `--version`
and the unknown-command message import neither torch nor Hydra: they answer in well under a second.
"""

from __future__ import annotations

import logging
import os
import sys

from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")

# name -> ("module:function", one-line description for `dgtrain --help`); each function takes the
# remaining argv and returns an exit code; every subcommand is dgtrain/commands/<name>.py.
# `dgtrain --help` lists exactly these.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": (
        "dgtrain.commands.eval:main",
        "score a run's weights on the val split or, with --split test, the test set",
    ),
    "explain": ("dgtrain.commands.explain:main", "saliency, attention and feature attributions as PNGs"),
    "export": ("dgtrain.commands.export:main", "export a run's model (pt2, onnx, torchscript), checked"),
    "graph": (
        "dgtrain.commands.graph:main",
        "draw the module diagram and the autograd graph of a real batch",
    ),
    "ls": ("dgtrain.commands.ls:main", "list config groups, their options and the recipes"),
    "plot": ("dgtrain.commands.plot:main", "overlay the curves of several runs in one figure"),
    "predict": ("dgtrain.commands.predict:main", "score new data (CSV, images) with a run's model"),
    "sample": ("dgtrain.commands.sample:main", "generate text (LM) or sequences (seq2seq) from a run"),
    "smoke": ("dgtrain.commands.smoke:main", "run the recipes' smoke contracts (metric bound, time, memory)"),
    "sweep-summary": (
        "dgtrain.commands.sweep_summary:main",
        "rebuild a sweep's results table, CSV, JSON and plot",
    ),
    "validate": ("dgtrain.commands.validate:main", "check configs and recipes without training"),
    "wandb-sweep": ("dgtrain.commands.wandb_sweep:main", "write a W&B sweep YAML for a sweep preset"),
}


def _entry(name: str) -> tuple[str, str]:
    """(target, description) of a subcommand; a bare "module:function" entry has no description."""
    value = SUBCOMMANDS[name]
    return (value, "") if isinstance(value, str) else value


def _config_groups() -> dict[str, list[str]]:
    """configs/<group>/<option>.yaml, read from disk (no Hydra import)."""
    from dgtrain.paths import config_dir, recipes_dir

    root = config_dir()
    groups = {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name != "hydra"
    }
    groups["recipe"] = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    return groups


def help_text() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    commands = "\n".join(f"  dgtrain {n:<{width}}  {_entry(n)[1]}".rstrip() for n in SUBCOMMANDS)
    groups = "\n".join(f"  {g}: {', '.join(opts)}" for g, opts in _config_groups().items())
    return f"""usage: dgtrain [group=option ...] [key=value ...]     train one model (Hydra overrides)
       dgtrain -m key=a,b ...                         sweep (Hydra multirun)
       dgtrain COMMAND [args]                         one of the commands below (COMMAND --help)

Commands:
{commands}

Config groups (group=option; `dgtrain ls` describes each option):
{groups}

Common overrides: device=auto|cpu|cuda precision=fp32|bf16|fp16 seed=N threads=N deterministic=true
  trainer.max_steps=N trainer.test_at_end=true optimizer.lr=X data.batch_size=N resume=auto

Options:
  --help, -h        this help
  --version         dgtrain's version
  --cfg job         print the composed config (with overrides) and exit
  --hydra-help      Hydra's own flags (--multirun, --config-dir, --info, ...)

Examples:
  dgtrain                                   convnet on scikit-learn's digits
  dgtrain model=linreg data=diabetes optimizer.lr=0.05
  dgtrain -m optimizer.lr=1e-3,1e-2 model=linreg,convnet
  dgtrain eval outputs/DATE/TIME_convnet --split test
"""


def _unknown_command(word: str) -> int:
    import difflib

    close = difflib.get_close_matches(word, list(SUBCOMMANDS), n=1)
    hint = f" Did you mean `dgtrain {close[0]}`?" if close else ""
    print(
        f"dgtrain: unknown command {word!r}.{hint} Commands: {', '.join(SUBCOMMANDS)}. Training takes "
        "group=option and key=value overrides (dgtrain model=mlp trainer.max_steps=100); dgtrain --help "
        "shows more.",
        file=sys.stderr,
    )
    return 2


def _is_override_or_flag(word: str) -> bool:
    """Hydra's command line: flags (-m, --cfg), overrides (a=b, +a=b, ++a=b) and deletions (~a)."""
    return word.startswith(("-", "+", "~")) or "=" in word


def _train_task(cfg):
    """The Hydra task function: one training run in Hydra's run directory; returns the sweep objective."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if "submitit" in str(hc.launcher.get("_target_", "")):
        from dgtrain.distributed import adopt_submitit_tasks

        adopt_submitit_tasks()  # a job of several SLURM tasks: each becomes one rank
    if hc.mode == RunMode.MULTIRUN:
        from dgtrain.sweep import run_trial

        return run_trial(cfg, hc)  # records a failed trial in its run dir, then re-raises
    run_dir = Path(hc.runtime.output_dir)
    preset = hc.runtime.choices.get("sweep")
    if preset and not os.environ.get("WANDB_SWEEP_ID"):  # the W&B agent runs its trials this way, on purpose
        log.warning(
            f"sweep={preset} is a sweep preset, but this is one run (no -m): it trains once with the "
            f"preset's fixed settings. To sweep, add -m: dgtrain -m sweep={preset}"
        )
    try:
        from dgtrain.distributed import run

        # alone, or as one worker of torchrun / trainer.devices=N, or launching those workers
        result = run(cfg, run_dir, hc)
        if result.exit_code:
            sys.exit(result.exit_code)
        return result.objective
    except DgtrainError as e:
        log.error(str(e))
        remove_untouched_run_dir(run_dir)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug, not a user mistake: one line here, the traceback in dgtrain.log
        internal_error(e, run_dir)
        sys.exit(1)


# What Hydra and dgtrain put into a run dir before training starts; a run dir holding nothing else
# belongs to a run rejected before it trained, and is removed (no outputs/DATE/TIME/ per typo).
UNTOUCHED = {".hydra", "dgtrain.log", "run.json", ".dgtrain.lock"}
HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def remove_untouched_run_dir(run_dir) -> bool:
    import json
    import shutil
    from pathlib import Path

    d, cwd = Path(run_dir).resolve(), Path.cwd().resolve()
    if d == cwd or cwd.is_relative_to(d):
        return False
    try:
        names = set(os.listdir(d))
        hydra_files = set(os.listdir(d / ".hydra")) if ".hydra" in names else set()
    except OSError:
        return False
    if not names <= UNTOUCHED or not hydra_files <= HYDRA_FILES:
        return False
    if ".dgtrain.lock" in names:  # another live run's dir in its first seconds is not ours to remove
        try:
            holder = json.loads((d / ".dgtrain.lock").read_text() or "{}")
        except (OSError, ValueError):
            return False
        if not isinstance(holder, dict) or holder.get("pid") != os.getpid():
            return False
    shutil.rmtree(d / ".hydra", ignore_errors=True)
    for name in names - {".hydra"}:
        (d / name).unlink(missing_ok=True)
    try:
        d.rmdir()
        parent = d.parent  # outputs/DATE/ that Hydra made for it: removed while empty, never above cwd
        while parent != cwd and parent.is_relative_to(cwd):
            parent.rmdir()
            parent = parent.parent
    except OSError:
        pass
    return True


def user_frame(e: BaseException):
    """The frame of a user's own code (a model, data, loss or callback) that `e` came from: walking out
    from where it was raised, through Python's library and installed packages (torch), the first frame
    that is not dgtrain's. None when dgtrain's own code comes first (a bug in dgtrain or in what it calls)."""
    import sysconfig
    import traceback
    from pathlib import Path

    paths = sysconfig.get_paths()
    library = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, paths["stdlib"], paths["purelib"]}]
    dgtrain_dir = Path(__file__).resolve().parent
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if frame.filename.startswith("<"):  # <string>, <frozen runpy>
            continue
        path = Path(frame.filename).resolve()
        if path.is_relative_to(dgtrain_dir):
            return None
        if not any(path.is_relative_to(d) for d in library):
            return frame
    return None


def internal_error(e: BaseException, run_dir) -> None:
    """An unexpected exception: one line on the console, the full traceback in <run_dir>/dgtrain.log."""
    import traceback
    from pathlib import Path

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    log_file = Path(run_dir) / "dgtrain.log"
    first = (str(e).splitlines() or [""])[0][:200]
    frame = user_frame(e)
    if frame is not None:  # a user's model, data, loss or callback (`_target_`), not dgtrain
        log.error(
            f"internal error: {type(e).__name__}: {first} (raised in {frame.filename}:{frame.lineno}, in "
            f"{frame.name}: code of yours, not dgtrain's; the full traceback is in {log_file})"
        )
    else:
        log.error(
            f"internal error: {type(e).__name__}: {first} (this is a bug in dgtrain or a library it uses; "
            f"the full traceback is in {log_file}, please include it in a report)"
        )
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.LogRecord("dgtrain", logging.ERROR, __file__, 0, "traceback:\n%s", (text,), None)
    for handler in files:
        handler.handle(record)
    if not any(Path(h.baseFilename) == log_file.resolve() for h in files):
        try:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            sys.stderr.write(text)


def check_overrides(argv: list[str]) -> str | None:
    """Problems Hydra would report with a traceback or a bare grammar error, said plainly: an override
    that does not parse (with the quoting hint), and hydra.run.dir / hydra.sweep.dir under a file."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args, _ = get_args_parser().parse_known_args(argv)
    parser = OverridesParser.create()
    given = set()
    for item in args.overrides or []:
        try:
            parsed = parser.parse_overrides([item])
        except OverrideParseException as e:
            key, sep, value = item.partition("=")
            hint = (
                f" A value with characters such as ~ & ; # ( ) or non-ASCII letters must be quoted for Hydra: "
                f"'{key}=\"{value}\"' (the outer single quotes are for the shell)."
                if sep
                else ""
            )
            return f"cannot parse the override {item!r}: {str(e).splitlines()[0]}.{hint}"
        for o in parsed:
            given.add(o.key_or_group)
            if o.key_or_group in config_groups() and not o.is_delete() and o.value() is None:
                return null_group(o.key_or_group)
            if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") and isinstance(o.value(), str):
                blocked = blocked_pattern(str(o.value()))
                if blocked:
                    return (
                        f"{o.key_or_group}={o.value()}: {blocked[0]} {blocked[1]}; the run's files could not "
                        f"be written. Choose another directory ({o.key_or_group}=...)."
                    )
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    writes = not (args.cfg or args.info or args.help or args.hydra_help or args.shell_completion)
    if writes and key not in given:  # the default (outputs/... or multirun/...), relative to the cwd
        pattern = default_dir(key)
        blocked = blocked_pattern(pattern)
        if blocked:
            return (
                f"the default {key} ({pattern}): {blocked[0]} {blocked[1]}; the run's files could "
                f"not be written. Move it away, or choose another directory ({key}=...)."
            )
    return None


def config_groups() -> set[str]:
    """The config groups a command line picks options of (configs/<group>/, and recipe)."""
    from dgtrain.paths import config_dir

    return {p.name for p in config_dir().iterdir() if p.is_dir() and p.name != "hydra"} | {"recipe"}


def null_group(group: str) -> str:
    """`logger=null`, `callbacks=null`: Hydra stops with a bare traceback (a group option must be a name or
    a list). What to write instead."""
    if group in ("logger", "callbacks"):
        fix = f"use {group}=[] (or '~{group}') for none" + (
            ": the console is always there" if group == "logger" else ""
        )
    elif group in ("recipe", "sweep"):
        fix = f"leave {group}=... out (none is the default), or remove one a config sets with '~{group}'"
    else:
        fix = f"pick one with {group}=NAME (dgtrain ls lists the options)"
    return f"{group}=null: a config group takes an option's name, not null; {fix}."


def blocked_pattern(pattern: str):
    """`blocked_dir` for a run-dir pattern: its part before the first `${...}` (what exists already)."""
    from dgtrain.paths import blocked_dir

    static = pattern.split("${", 1)[0]
    return blocked_dir(static) if static else None


def default_dir(key: str) -> str:
    """hydra.run.dir or hydra.sweep.dir as configs/train.yaml sets it, unresolved."""
    import yaml

    from dgtrain.paths import config_dir

    node = yaml.safe_load((config_dir() / "train.yaml").read_text(encoding="utf-8")) or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return str(node or "")


def train_main() -> None:
    import hydra

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir
    from dgtrain.recipes import register_recipes

    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"dgtrain: error: {problem}", file=sys.stderr)
        sys.exit(2)
    register_schema()
    register_recipes()  # recipes/NAME.yaml -> `dgtrain recipe=NAME`
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)()


def main() -> None:
    first = sys.argv[1] if len(sys.argv) > 1 else None
    if first in ("--help", "-h"):
        print(help_text(), end="")
        sys.exit(0)
    if first in ("--version", "-V"):
        from dgtrain import __version__

        print(f"dgtrain {__version__}")
        sys.exit(0)
    if first is not None and first in SUBCOMMANDS:
        import importlib

        name = first
        module, func = _entry(name)[0].split(":")
        try:
            code = getattr(importlib.import_module(module), func)(sys.argv[2:])
        except DgtrainError as e:
            print(f"dgtrain {name}: error: {e}", file=sys.stderr)
            code = e.exit_code
        except BrokenPipeError:  # `dgtrain sample RUN | head`: the reader has gone; stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            code = 141  # 128 + SIGPIPE: what a shell reports for a command stopped by a closed pipe
        sys.exit(code)
    if first is not None and not _is_override_or_flag(first):
        sys.exit(_unknown_command(first))
    train_main()
