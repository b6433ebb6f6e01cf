"""The `_target_` allow-list judges what a name resolves to, not only how it is spelt."""

from __future__ import annotations

import pytest

from dgtrain.config import locate
from dgtrain.errors import DgtrainError


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.exec",
        "torch.os.system",  # a module re-exported under an allowed prefix
        "dgtrain.faults.subprocess.run",
        "dgtrain.config.importlib.import_module",
        "torch.hub.load",  # allowed prefix, but fetches and runs remote code
        "torch.load",
        "dgtrain.config.locate.__globals__",
    ],
)
def test_dangerous_targets_are_refused(target):
    with pytest.raises(DgtrainError, match="is not allowed"):
        locate(target)


@pytest.mark.parametrize(
    "target",
    ["torch.optim.AdamW", "torch.optim.lr_scheduler.StepLR", "dgtrain.models.mlp.MLP", "dgtrain.optim.step"],
)
def test_ordinary_targets_resolve(target):
    assert callable(locate(target))


def test_a_user_prefix_widens_the_list_only_for_its_own_modules():
    with pytest.raises(DgtrainError):
        locate("json.dumps")
    assert locate("json.dumps", ("dgtrain.", "torch.", "json.")) is __import__("json").dumps


def test_the_cli_refuses_a_smuggled_target_before_running_it(tmp_path):
    from tests.conftest import run_cli

    sentinel = tmp_path / "pwned"
    p = run_cli(
        [
            "model=linreg",
            "trainer.max_steps=2",
            f"+logger.x={{_target_: torch.os.system, command: 'touch {sentinel}'}}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "torch.os.system" in p.stdout + p.stderr
    assert not sentinel.exists()
