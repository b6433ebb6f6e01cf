"""`dgtrain <subcommand>`: one module per subcommand, each with `main(argv) -> exit code` (see dgtrain/cli.py)."""

from __future__ import annotations

import argparse


def add_run_options(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The options of every command that loads a run through dgtrain/runs.py: where to run it, and the
    user packages its stored config may name in `_target_` (the stored `allowed_targets` is not trusted)."""
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PKG",
        help="a trusted package of yours whose callables the stored config may name in `_target_` (repeatable)",
    )
