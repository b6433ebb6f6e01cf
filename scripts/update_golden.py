"""Refresh the golden loss curves under tests/golden/ (see dgtrain/golden.py).

Run it from the repository root after a change that is meant to alter training, then review and
commit the diff:  python scripts/update_golden.py [NAME ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dgtrain

from dgtrain.golden import GOLDEN_RECIPES, compare, golden_dir, load, run_curve, save  # noqa: E402


def main(names: list[str]) -> int:
    for name in names or GOLDEN_RECIPES:
        if name not in GOLDEN_RECIPES:
            print(f"{name}: not a golden recipe ({', '.join(GOLDEN_RECIPES)})", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            record = run_curve(name, Path(tmp) / "run")
        old = (golden_dir() / f"{name}.json").is_file() and compare(load(name), record)
        path = save(record)
        print(
            f"{path}: {len(record['steps'])} steps"
            + (f", changed ({len(old)} step(s) beyond tolerance)" if old else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
