"""Recipes: named, complete experiments in `recipes/NAME.yaml`, exposed as the Hydra group `recipe`.

A recipe file is an experiment config in the lightning-hydra-template style: `# @package _global_`,
a defaults list of `override /group: option` entries, then values. Its first line is the exact command
that runs it (`# dgtrain recipe=NAME`), its next comment line says what it is, and its `smoke:` node
is the contract `dgtrain smoke` checks.

The folder is not a Hydra config group on disk (it lives at the top of the repository, or inside the
installed package as dgtrain/recipes), so each file is stored in Hydra's ConfigStore under group
`recipe` at start-up; `configs/train.yaml` ends its defaults list with `recipe: null` (not `optional`: that would silently ignore a misspelt recipe name), so a
recipe's overrides come after the model's, and command-line overrides still win over both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from dgtrain.errors import DgtrainError
from dgtrain.paths import config_dir, recipes_dir


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    command: str  # the first line, without "# "
    description: str


def header_lines(path: Path) -> list[str]:
    """The comment lines at the top of a YAML file, without their '#'."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line.lstrip("#").strip())
    return out


def describe(path: Path) -> str:
    """A config file's description: its first paragraph of comment lines that are not a directive or a
    command, joined into one line (`dgtrain ls` wraps it)."""
    words: list[str] = []
    for line in header_lines(path):
        if line.startswith("@package") or line.startswith("dgtrain "):
            if words:
                break
            continue
        if not line:
            if words:
                break
            continue
        words.append(line)
    return " ".join(words)


def list_recipes(root: Path | None = None) -> list[Recipe]:
    root = root or recipes_dir()
    out = []
    for path in sorted(root.glob("*.yaml")):
        lines = header_lines(path)
        out.append(Recipe(path.stem, path, lines[0] if lines else "", describe(path)))
    return out


def find_recipe(name: str) -> Recipe:
    recipes = {r.name: r for r in list_recipes()}
    if name not in recipes:
        raise DgtrainError(
            f"no recipe named {name!r} in {recipes_dir()}. Recipes: {', '.join(recipes) or '(none)'}."
        )
    return recipes[name]


def select(items: list[str]) -> tuple[list[Recipe], list[str]]:
    """Split `NAME | key=value` command-line items: the named recipes (all of them when none is named)
    and the overrides that apply to each."""
    names = [x for x in items if "=" not in x]
    overrides = [x for x in items if "=" in x]
    return ([find_recipe(n) for n in names] if names else list_recipes()), overrides


def load_recipe(path: Path) -> DictConfig:
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise DgtrainError(f"{path}: a recipe must be a YAML mapping (see docs/recipes.md).")
    package = next((x.split()[1] for x in header_lines(path) if x.startswith("@package") and " " in x), None)
    if package != "_global_":
        raise DgtrainError(
            f"{path}: a recipe must start with the comment lines `# dgtrain recipe={path.stem}` and "
            "`# @package _global_` (it sets keys at the top level, like model=... on the command line)."
        )
    return node


def register_recipes() -> None:
    """Store every recipe file in Hydra's ConfigStore as `recipe/NAME` (package _global_)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.repo.pop("recipe", None)  # forget recipes of another folder (DGTRAIN_RECIPES_DIR) stored earlier
    for r in list_recipes():
        cs.store(group="recipe", name=r.name, node=load_recipe(r.path), package="_global_")


def compose(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """Compose `train` with recipes registered, in-process (no torch); returns (config, group choices).

    Raises Hydra's and OmegaConf's own exceptions for an unknown key, option or a bad value."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgtrain.config import register_schema

    register_schema()
    register_recipes()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def missing_data_files(cfg: DictConfig) -> str | None:
    """Why the data of `cfg` cannot be read from disk (files absent), or None; loads nothing.

    Only datasets read from files are checked (mnist, cifar10, csv/text with a `path`); the others are
    generated or bundled with scikit-learn."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return None
    target = str(data.get("_target_", ""))
    if target == "dgtrain.data.images.mnist":
        from dgtrain.data.images import MNIST_FILES, _find

        root = Path(str(data.root)).expanduser()
        absent = [f for f in MNIST_FILES.values() if _find(root, f, ("", "MNIST/raw", "raw")) is None]
        if absent:
            return f"MNIST files not found under data.root={root.resolve()} ({', '.join(absent)})"
    elif target == "dgtrain.data.images.cifar10":
        from dgtrain.data.images import CIFAR_TEST, CIFAR_TRAIN

        root = Path(str(data.root)).expanduser()
        folders = (root / "cifar-10-batches-py", root)
        if not any(all((d / n).is_file() for n in CIFAR_TRAIN + CIFAR_TEST) for d in folders):
            return f"CIFAR-10 batches not found under data.root={root.resolve()} (cifar-10-batches-py/)"
    elif data.get("path") and not OmegaConf.is_missing(data, "path"):
        path = Path(str(data.path)).expanduser()
        if not path.is_file():
            return f"data.path={path} not found"
    return None


def _target_of(path: Path) -> str:
    """For an option file without a description: the callable it names (`_target_`), if any."""
    target = OmegaConf.load(path).get("_target_")
    return f"({target})" if target else ""


@lru_cache(maxsize=1)
def group_options() -> dict[str, list[tuple[str, str]]]:
    """Each config group under configs/ (not hydra's own) -> [(option, one-line description)]."""
    root = config_dir()
    groups = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[d.name] = [(p.stem, describe(p) or _target_of(p)) for p in sorted(d.glob("*.yaml"))]
    return groups
