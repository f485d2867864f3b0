"""`python -m seal_fast.data verify DIR` and `python -m seal_fast.data prepare ZIP --to DIR` (verify.py)."""

from __future__ import annotations

import sys

from ..cli import command_parser
from ..errors import cli_main
from .verify import prepare, verify


def build_parser():
    p = command_parser("data", "Check or unpack Tiny-ImageNet: the full set (exit 0), short of it (exit 1), or a "
                       "one-line error (exit 2).", module="seal_fast.data")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{verify,prepare}",
                           help="verify: check a folder; prepare: check the zip's md5, unpack it and verify")
    v = sub.add_parser("verify", help="check a tiny-imagenet-200 folder against the full set",
                       description="Count classes and images of a tiny-imagenet-200 folder against the full set "
                                   "(200 classes, 500 train images each, 10,000 val images in val_annotations.txt); says what is "
                                   "missing or extra.")
    v.add_argument("dir", metavar="DIR", help="the tiny-imagenet-200 folder (the one holding wnids.txt, train/, val/)")
    pr = sub.add_parser("prepare", help="check the zip's md5, unpack it and verify",
                        description="Check the official tiny-imagenet-200.zip's md5, unpack it into --to and verify "
                                    "the result (http://cs231n.stanford.edu/tiny-imagenet-200.zip).")
    pr.add_argument("zip", metavar="ZIP", help="the downloaded tiny-imagenet-200.zip")
    pr.add_argument("--to", required=True, metavar="DIR", help="folder to unpack into (gets tiny-imagenet-200/)")
    return p


def run(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd == "verify":
        return verify(args.dir)
    return prepare(args.zip, args.to)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
