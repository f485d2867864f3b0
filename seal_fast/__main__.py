"""`python -m seal_fast COMMAND [ARGS]`: every command of the project in one place (each is also a console script,
seal-COMMAND, and `python -m seal_fast.train` stays the trainer's own entry)."""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) runs it, what it does); the room a module sits in is docs/architecture.md's
COMMANDS = {
    "train": ("seal_fast.train", "train SEAL / LLF / normal on Tiny-ImageNet (also python -m seal_fast.train)"),
    "data": ("seal_fast.data.__main__", "verify a tiny-imagenet-200 folder, or unpack and verify the zip"),
    "evaluate": ("seal_fast.evaluate", "top-1 / top-5 (and per-class accuracy) of a checkpoint on a val set"),
    "sweep": ("seal_fast.runs.sweep", "every (run kind, seed) of the paper's table, each in its own folder"),
    "report": ("seal_fast.runs.report", "the paper's table from run folders; --studies: the study page"),
    "depth": ("seal_fast.studies.depth", "KNN probes after every block and each sample's prediction depth"),
    "transfer": ("seal_fast.studies.transfer", "linear probe of a frozen backbone on other datasets"),
    "fewshot": ("seal_fast.studies.fewshot", "episodic few-shot evaluation of a frozen backbone"),
    "hessian": ("seal_fast.studies.hessian", "Hessian top eigenvalue, trace and eigenvalue density"),
    "pof": ("seal_fast.studies.pof", "PoF: post-training of the feature extractor"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: python -m seal_fast COMMAND [ARGS]   (python -m seal_fast COMMAND --help: its flags)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
