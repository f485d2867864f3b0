"""`python -m seal_fast.data verify DIR` and `python -m seal_fast.data prepare ZIP --to DIR` (verify.py)."""

from __future__ import annotations

import argparse
import sys

from ..errors import cli_main
from .verify import prepare, verify


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seal_fast.data",
                                description="Check or unpack Tiny-ImageNet: the full set, or a non-zero exit.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a tiny-imagenet-200 folder against the full set")
    v.add_argument("dir")
    pr = sub.add_parser("prepare", help="check the zip's md5, unpack it and verify")
    pr.add_argument("zip")
    pr.add_argument("--to", required=True, metavar="DIR", help="folder to unpack into (gets tiny-imagenet-200/)")
    args = p.parse_args(argv)
    if args.cmd == "verify":
        return verify(args.dir)
    return prepare(args.zip, args.to)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
