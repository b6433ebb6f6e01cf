"""`_target_` nodes are built as Hydra's `instantiate` builds them, and every nested target is allow-listed."""

from __future__ import annotations

import functools

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from dgtrain.config import build
from dgtrain.errors import DgtrainError

ALLOWED = ("tests",)  # the user package these tests name in allowed_targets


def make(d, **kw):
    return build(OmegaConf.create(d), allowed=ALLOWED, key="model", **kw)


def test_nested_targets_are_built_first():
    model = make(
        {
            "_target_": "tests.targets.Classifier",
            "net": {"_target_": "tests.targets.Backbone", "in_features": 4, "hidden": 8},
            "num_classes": 3,
        }
    )
    assert model.head.in_features == 8 and model.head.out_features == 3
    assert type(model.net).__name__ == "Backbone"


def test_nested_targets_inside_lists_and_args():
    args, kwargs = make(
        {
            "_target_": "tests.targets.record",
            "_args_": [1, {"_target_": "torch.nn.Identity"}],
            "layers": [{"_target_": "torch.nn.ReLU"}, 2],
        }
    )
    assert args[0] == 1 and type(args[1]).__name__ == "Identity"
    assert type(kwargs["layers"][0]).__name__ == "ReLU" and kwargs["layers"][1] == 2


def test_partial_nested_and_top_level():
    out = make(
        {
            "_target_": "tests.targets.record",
            "opt": {"_target_": "tests.targets.record", "_partial_": True, "lr": 0.1},
        }
    )
    opt = out[1]["opt"]
    assert isinstance(opt, functools.partial) and opt("params") == (("params",), {"lr": 0.1})
    top = make({"_target_": "tests.targets.record", "_partial_": True, "a": 1})
    assert top(2) == ((2,), {"a": 1})


def test_convert_none_passes_omegaconf_containers_and_default_plain():
    plain = make({"_target_": "tests.targets.record", "d": {"x": 1}, "l": [1, 2]})[1]
    assert type(plain["d"]) is dict and type(plain["l"]) is list
    oc = make({"_target_": "tests.targets.record", "_convert_": "none", "d": {"x": 1}, "l": [1, 2]})[1]
    assert isinstance(oc["d"], DictConfig) and isinstance(oc["l"], ListConfig)
    with pytest.raises(DgtrainError, match=r"model._convert_='sometimes'"):
        make({"_target_": "tests.targets.record", "_convert_": "sometimes"})


def test_recursive_false_passes_nested_nodes_as_config():
    out = make(
        {"_target_": "tests.targets.record", "_recursive_": False, "net": {"_target_": "torch.nn.ReLU"}}
    )
    assert out[1]["net"] == {"_target_": "torch.nn.ReLU"}


def test_every_nested_target_is_allow_listed():
    with pytest.raises(DgtrainError, match=r"model\.net\._target_='os\.system' is not allowed"):
        make(
            {
                "_target_": "tests.targets.Classifier",
                "net": {"_target_": "os.system", "_args_": ["true"]},
                "num_classes": 2,
            }
        )
    with pytest.raises(DgtrainError, match=r"model\._args_\[0\]\._target_"):
        make({"_target_": "tests.targets.record", "_args_": [{"_target_": "subprocess.run"}]})
