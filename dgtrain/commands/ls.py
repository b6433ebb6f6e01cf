"""`dgtrain ls`: the config groups with their options, and the recipes, each with a one-line description."""

from __future__ import annotations

import argparse
import shutil
import textwrap


def _entry(name: str, desc: str, width: int, columns: int) -> str:
    """`    name    the whole description, wrapped under itself`."""
    indent = " " * (4 + width + 2)
    return textwrap.fill(
        desc or "-",
        width=max(columns, len(indent) + 30),
        initial_indent=f"    {name:<{width}}  ",
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,
    )


def main(argv: list[str]) -> int:
    from dgtrain.paths import config_dir, recipes_dir
    from dgtrain.recipes import group_options, list_recipes

    argparse.ArgumentParser(
        prog="dgtrain ls", description="List config groups, their options and the recipes."
    ).parse_args(argv)
    groups = group_options()
    width = max([len(n) for opts in groups.values() for n, _ in opts] + [len(r.name) for r in list_recipes()])
    columns = shutil.get_terminal_size((100, 24)).columns
    print(f"Config groups (dgtrain GROUP=OPTION; from {config_dir()}):")
    for group, options in groups.items():
        print(f"\n  {group}")
        for name, desc in options:
            print(_entry(name, desc, width, columns))
    print(f"\nRecipes (dgtrain recipe=NAME; from {recipes_dir()}):")
    for r in list_recipes():
        print(_entry(r.name, r.description, width, columns))
    return 0
