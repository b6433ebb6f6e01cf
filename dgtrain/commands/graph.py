"""`dgtrain graph model=X [data=...] [overrides] [graph.out=DIR] [graph.batches=N] [graph.depth=D]`:
draw the graph one real batch builds (dgtrain/graph.py does the work) and print a compact report."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError

USAGE = """usage: dgtrain graph model=NAME [data=NAME] [key=value ...] [graph.out=DIR] [graph.batches=N] [graph.depth=D]

Draw the graph one real batch builds: the module-level data flow and the op-level autograd graph
(shapes, bytes saved for backward), as Mermaid (.md) and Graphviz (.dot; .svg/.png when `dot` is
installed), and print a compact tree. Any training override (data=..., model.d_model=...) applies.

  graph.out=DIR      output folder (default ./graph_<model>); an earlier drawing's files there are replaced
  graph.batches=N    graph N batches, of different shapes where the data has them (default 1)
  graph.depth=D      module-level diagram: draw modules D levels deep as one box (default 2)
"""

GRAPH_KEYS = {"out": str, "batches": int, "depth": int}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    opts: dict[str, Any] = {"out": None, "batches": 1, "depth": 2}
    overrides = []
    for arg in argv:
        if arg.startswith("graph."):
            key, eq, value = arg[len("graph.") :].partition("=")
            if key not in GRAPH_KEYS or not eq:
                raise DgtrainError(
                    f"{arg!r}: dgtrain graph takes graph.out=DIR, graph.batches=N and graph.depth=D."
                )
            try:
                opts[key] = GRAPH_KEYS[key](value)
            except ValueError:
                raise DgtrainError(f"{arg!r}: graph.{key} must be an integer.") from None
        elif "=" not in arg and Path(arg).exists():  # `dgtrain graph RUN_DIR`: Hydra says "missing EQUAL"
            raise DgtrainError(
                f"{arg}: dgtrain graph takes the overrides a training run takes (model=NAME data=NAME key=value), "
                "not a run dir or a file; give the run's model and data options, e.g. dgtrain graph model=mlp."
            )
        else:
            overrides.append(arg)
    for key in ("batches", "depth"):
        if opts[key] < 1:
            raise DgtrainError(f"graph.{key}={opts[key]}: must be at least 1.")
    if opts["out"] and Path(opts["out"]).exists() and not Path(opts["out"]).is_dir():
        raise DgtrainError(
            f"graph.out={opts['out']} is a file; dgtrain graph writes a folder (.md, .dot, graph.json). "
            "Give a folder path."
        )
    return opts, overrides


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    opts, overrides = parse_args(argv)
    from dgtrain.graph import compose_config, draw
    from dgtrain.validation import check_config

    cfg, choices = compose_config(overrides)
    check_config(cfg, choices)
    d = draw(cfg, choices, opts["out"], opts["batches"], opts["depth"])
    print_report(d.model, d.shapes, opts["depth"], d.graphs, d.changes, d.written)
    return 0


def print_report(model, shapes, depth, graphs, changes, written) -> None:
    from dgtrain.graph import fmt_bytes, module_tree

    print("\n".join(module_tree(model, shapes, depth)))
    print()
    for i, g in enumerate(graphs, 1):
        top = sorted((o for o in g["ops"] if o.saved_bytes), key=lambda o: -o.saved_bytes)[:5]
        print(
            f"batch {i}: shapes {g['shapes']} | {g['nodes']} autograd nodes | "
            f"saved for backward {fmt_bytes(g['saved_bytes'])} in {g['saved_tensors']} tensors"
        )
        for o in top:
            print(f"    {o.name:<28} {o.shape:<14} saved {fmt_bytes(o.saved_bytes)}")
    for i, c in enumerate(changes, 2):
        (n0, n1), (b0, b1) = c["nodes"], c["saved_bytes"]
        line = f"batch {i - 1} → {i}: nodes {n0} → {n1}, saved {fmt_bytes(b0)} → {fmt_bytes(b1)}"
        if c["same_structure"]:
            line += f"; same ops, {c['shape_changes']} changed shape"
            line += "".join(f"\n    {e}" for e in c["examples"])
        else:
            line += "; op counts changed: " + ", ".join(
                f"{k} {a}→{b}" for k, (a, b) in c["op_count_changes"].items()
            )
        print(line)
    if shutil.which("dot") is None:
        print("(Graphviz `dot` not found: wrote .dot files but no .svg/.png)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
