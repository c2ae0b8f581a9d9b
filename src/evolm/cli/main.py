"""``evolm``: one entry point with nested verbs (``evolm info MODEL``, ...)."""

from __future__ import annotations

import argparse
import sys

from evolm.cli import eval as evaluate
from evolm.cli import generate, info, train
from evolm.errors import EvolmError

VERBS = {"info": info, "generate": generate, "train": train, "eval": evaluate}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolm", description="Build, load, train, evaluate and serve language models."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERBS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (EvolmError, FloatingPointError) as e:
        verb = " ".join(filter(None, [args.verb, getattr(args, "recipe", None)]))
        print(f"evolm {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
