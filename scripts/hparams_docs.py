"""Write docs/hyperparameters.md and the command line's catalog (agm_fast/cli/methods.json) from the methods'
declarations (``python scripts/hparams_docs.py``).

Both are generated, never edited by hand: tests/test_registry.py checks that they match the declarations.
"""

from __future__ import annotations

import os
import sys

from agm_fast import methods
from agm_fast.cli import catalog
from agm_fast.methods.hparams import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs", "hyperparameters.md")


def render() -> str:
    """The page's text."""
    parts = [
        "# Hyper-parameters of every method",
        "",
        "Generated from each method's declaration (`agm_fast/methods/<name>/config.py`) by `scripts/hparams_docs.py`;",
        "the same declaration gives the command line's flags, `Method.defaults()`, `Method.describe()` and what a",
        "checkpoint records. Every method also takes `window`, `seed` and `task` (docs/methods.md, section 0).",
        "The authors' published settings per data set, and how to choose: docs/hyperparameter-guide.md.",
    ]
    for name in methods.available():
        cls, preset = methods.get(name)
        parts += ["", f"## `{name}`", ""]
        if preset:
            parts += ["Fixed by the name: " + ", ".join(f"`{k}={v!r}`" for k, v in preset.items()) + ".", ""]
        parts.append(table(cls.HPARAMS, fixed=tuple(preset)) if len(cls.HPARAMS) else "No hyper-parameters.")
    return "\n".join(parts) + "\n"


def main() -> int:
    for path, text in ((PATH, render()), (catalog.CATALOG_PATH, catalog.generate())):
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
