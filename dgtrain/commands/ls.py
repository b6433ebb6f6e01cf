"""`dgtrain ls`: the config groups with their options, and the recipes, each with a one-line description."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    from dgtrain.paths import config_dir, recipes_dir
    from dgtrain.recipes import group_options, list_recipes

    argparse.ArgumentParser(
        prog="dgtrain ls", description="List config groups, their options and the recipes."
    ).parse_args(argv)
    groups = group_options()
    width = max([len(n) for opts in groups.values() for n, _ in opts] + [len(r.name) for r in list_recipes()])
    print(f"Config groups (dgtrain GROUP=OPTION; from {config_dir()}):")
    for group, options in groups.items():
        print(f"\n  {group}")
        for name, desc in options:
            print(f"    {name:<{width}}  {desc}")
    print(f"\nRecipes (dgtrain recipe=NAME; from {recipes_dir()}):")
    for r in list_recipes():
        print(f"    {r.name:<{width}}  {r.description}")
    return 0
