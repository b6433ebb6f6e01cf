"""The `_target_` allow-list: exact names (dgtrain's builders, torch.optim / lr_scheduler / nn classes),
plus the user's own packages named in `allowed_targets`; never a prefix such as `torch.`."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest

from dgtrain.config import DGTRAIN_TARGETS, locate, torch_targets
from dgtrain.errors import DgtrainError
from tests.conftest import run_cli

# Callables reachable under `torch` (or re-exported there) that run commands, fetch or unpickle code.
DANGEROUS = [
    "torch.utils.collect_env.run",  # runs its argument through a shell
    "torch.utils.collect_env.run_and_read_all",
    "torch.serialization.load",  # torch.load under another name
    "torch.load",
    "torch.serialization.pickle.loads",
    "torch.hub.load",
    "torch.hub.load_state_dict_from_url",
    "torch.hub.download_url_to_file",
    "torch.jit.load",
    "torch.package.PackageImporter",
    "torch.utils.cpp_extension.load",
    "torch.utils.cpp_extension.load_inline",
    "torch.utils.cpp_extension.subprocess.run",
    "torch._C._jit_pass_inline",
    "torch._C.import_ir_module",
    "torch.os.system",
    "torch.multiprocessing.spawn",
    "torch.distributed.rpc.rpc_sync",
    "torch.optim.optimizer.torch.load",
    "torch.nn.modules.module.torch.load",
    "torch.Tensor",  # a torch class, but not an optimizer, scheduler or nn module
    "torch.optim.Optimizer.__init__",
    "dgtrain.faults.subprocess.run",
    "dgtrain.faults.slurm_requeue",  # a dgtrain function that runs a command, not a builder
    "dgtrain.config.importlib.import_module",
    "dgtrain.config.locate.__globals__",
    "os.system",
    "subprocess.run",
    "pickle.loads",
    "builtins.exec",
]


@pytest.mark.parametrize("target", DANGEROUS)
def test_dangerous_callables_are_refused(target):
    with pytest.raises(DgtrainError, match="is not allowed") as e:
        locate(target, key="model._target_")
    assert e.value.exit_code == 2
    assert str(e.value).startswith(f"model._target_={target!r}")


@pytest.mark.parametrize("node", ["model", "optimizer", "loss", "scheduler"])
@pytest.mark.parametrize(
    "target", ["torch.utils.collect_env.run", "torch.serialization.load", "torch.hub.load"]
)
def test_compose_time_check_names_the_key(compose, node, target):
    from dgtrain.validation import problems

    cfg = compose(["model=linreg", f"{node}._target_={target}"])
    found = problems(cfg)
    assert any(p.startswith(f"{node}._target_={target!r} is not allowed") for p in found), found


def test_every_admitted_name_is_a_builder_or_an_exact_torch_class():
    import torch
    from torch.optim.lr_scheduler import LRScheduler

    for name in DGTRAIN_TARGETS:
        module_name, _, attr = name.rpartition(".")
        obj = getattr(importlib.import_module(module_name), attr)
        assert obj.__module__ == module_name, name  # defined there, not re-exported
        if inspect.isclass(obj):
            from dgtrain.callbacks import Callback

            assert (
                issubclass(obj, torch.nn.Module)
                or issubclass(obj, Callback)
                or module_name.startswith("dgtrain.loggers.")
            ), name
        else:
            assert inspect.isfunction(obj), name
        assert locate(name) is obj

    admitted = torch_targets()
    assert {
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.StepLR",
        "torch.nn.MSELoss",
        "torch.nn.Linear",
    } <= set(admitted)
    homes = {torch.optim.Optimizer: "torch.optim", LRScheduler: "torch.optim.lr_scheduler"}
    homes[torch.nn.Module] = "torch.nn.modules"
    for name, cls in admitted.items():
        assert inspect.isclass(cls), name
        base = next(b for b in homes if issubclass(cls, b))
        assert cls is not base and cls.__module__.startswith(homes[base]), name
        namespace, _, attr = name.rpartition(".")
        assert getattr(importlib.import_module(namespace), attr) is cls, name  # the exact name resolves
        assert namespace in ("torch.optim", "torch.optim.lr_scheduler", "torch.nn", cls.__module__), name
        assert locate(name) is cls


def test_shipped_configs_name_only_admitted_targets(compose):
    from omegaconf import OmegaConf

    from dgtrain.config import find_targets
    from dgtrain.paths import config_dir

    for path in sorted(config_dir().glob("*/*.yaml")):
        if path.parent.name in ("hydra", "sweep"):
            continue  # Hydra's own nodes (sweepers, callbacks) are instantiated by Hydra, not dgtrain
        for key, target in find_targets(OmegaConf.to_container(OmegaConf.load(path))):
            assert callable(locate(target, key=key)), (path, key)


USER_PKG = {
    "__init__.py": "",
    "models.py": (
        "import subprocess\n"
        "from os import system\n"
        "import torch\n\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self, n: int = 2):\n"
        "        super().__init__(n, 1)\n\n"
        "run = subprocess.run\n"
    ),
}


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    for name, text in USER_PKG.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg"
    for mod in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[mod]


def test_a_user_package_admits_only_callables_defined_in_it(user_pkg):
    with pytest.raises(DgtrainError, match="not in dgtrain's allow-list"):
        locate("mypkg.models.Net")
    for spelling in (("mypkg",), ("mypkg.",)):
        assert locate("mypkg.models.Net", spelling).__name__ == "Net"
    for smuggled, why in [
        ("mypkg.models.system", "defined in module 'posix'"),
        ("mypkg.models.run", "defined in module 'subprocess'"),
        ("mypkg.models.subprocess.run", "passes through module 'subprocess'"),
        ("mypkg.models.torch.load", "passes through module 'torch'"),
    ]:
        with pytest.raises(DgtrainError, match=why):
            locate(smuggled, ("mypkg",))


@pytest.mark.parametrize("entry", ["torch", "torch.", "os", "subprocess", "builtins", "dgtrain", "pickle"])
def test_allowed_targets_cannot_name_a_protected_package(compose, entry):
    from dgtrain.validation import problems

    cfg = compose(
        ["model=linreg", f"allowed_targets=[{entry}]", "model._target_=torch.utils.collect_env.run"]
    )
    found = problems(cfg)
    assert any(p.startswith(f"allowed_targets={entry!r}: ") for p in found), found
    assert any("model._target_='torch.utils.collect_env.run' is not allowed" in p for p in found), found
    with pytest.raises(DgtrainError):
        locate("torch.utils.collect_env.run", (entry,))


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["model._target_=torch.utils.collect_env.run", "+model.command=touch {sentinel}"],
        ["+logger.x={{_target_: torch.utils.collect_env.run, command: 'touch {sentinel}'}}"],
        ["model._target_=torch.serialization.load", "+model.f={sentinel}", "+model.weights_only=false"],
    ],
    ids=["model-collect_env", "logger-collect_env", "serialization-load"],
)
def test_the_cli_refuses_each_reported_exploit_before_running_it(tmp_path, args):
    sentinel = tmp_path / "pwned"
    run = tmp_path / "run"
    p = run_cli(
        [
            "model=linreg",
            "trainer.max_steps=2",
            *[a.format(sentinel=sentinel) for a in args],
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    key = "logger.x._target_" if "logger" in args[0] else "model._target_"
    assert f"{key}=" in p.stdout + p.stderr and "is not allowed" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert not sentinel.exists()


# ------------------------------------------------------------------ stored configs are untrusted input


@pytest.fixture
def finished_run(compose, tmp_path):
    from dgtrain.train import fit

    run = tmp_path / "good"
    cfg = compose(["model=linreg", "trainer.max_steps=2", "checkpoint.every=1", "device=cpu"])
    fit(cfg, run)
    return run


def _evil(node: dict, sentinel) -> None:
    node["model"] = {"_target_": "torch.utils.collect_env.run", "command": f"touch {sentinel}"}


def _crafted_checkpoint(run, sentinel, dest):
    from dgtrain import checkpoint as ckpt_io

    state = ckpt_io.load(ckpt_io.list_checkpoints(run / "checkpoints")[-1])
    _evil(state["config"], sentinel)
    state["config"]["allowed_targets"] = ["torch."]  # a stored list cannot widen the allow-list
    return ckpt_io.save(state, dest)


def test_eval_refuses_a_crafted_checkpoint_and_run_dir_before_building(finished_run, tmp_path):
    import yaml

    sentinel = tmp_path / "pwned"
    ckpt = _crafted_checkpoint(finished_run, sentinel, tmp_path / "evil.pt")
    p = run_cli(["eval", str(ckpt)], tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "model._target_='torch.utils.collect_env.run' is not allowed" in p.stderr
    assert "Traceback" not in p.stderr

    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    _evil(config, sentinel)
    (finished_run / "config.yaml").write_text(yaml.safe_dump(config))
    from dgtrain.commands.eval import main as eval_main

    with pytest.raises(
        DgtrainError, match=r"model\._target_='torch\.utils\.collect_env\.run' is not allowed"
    ):
        eval_main([str(finished_run)])
    assert not sentinel.exists()


@pytest.mark.parametrize("how", ["file", "dir", "auto"])
def test_resume_refuses_a_crafted_checkpoint_before_building(compose, finished_run, tmp_path, how):
    from dgtrain import checkpoint as ckpt_io
    from dgtrain.train import fit

    sentinel = tmp_path / "pwned"
    newest = ckpt_io.list_checkpoints(finished_run / "checkpoints")[-1]
    crafted = _crafted_checkpoint(finished_run, sentinel, newest)  # in place: resume=auto finds it
    resume = {"file": str(crafted), "dir": str(finished_run), "auto": "auto"}[how]
    run = finished_run if how == "auto" else tmp_path / "new"
    cfg = compose(["model=linreg", "trainer.max_steps=4", "device=cpu", f"resume={resume}"])
    with pytest.raises(
        DgtrainError, match=r"model\._target_='torch\.utils\.collect_env\.run' is not allowed"
    ):
        fit(cfg, run)
    assert not sentinel.exists()


def test_plot_and_sweep_summary_read_crafted_dirs_without_running_anything(finished_run, tmp_path):
    import yaml

    sentinel = tmp_path / "pwned"
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    _evil(config, sentinel)
    (finished_run / "config.yaml").write_text(yaml.safe_dump(config))
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    (sweep / "0" / "config.yaml").write_text(yaml.safe_dump(config))
    multirun = {**config, "hydra": {"sweeper": {"_target_": "torch.utils.collect_env.run"}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    from dgtrain.commands.plot import main as plot_main
    from dgtrain.commands.sweep_summary import main as summary_main

    pytest.importorskip("matplotlib")
    assert plot_main([str(finished_run), "-o", str(tmp_path / "p.png")]) == 0
    assert summary_main([str(sweep), "--no-plot", "--json"]) == 0
    assert not sentinel.exists()
