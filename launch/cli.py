"""The `placerl` command: one subcommand per file under launch/.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only
dispatches, so that `placerl --help` stays cheap (nothing heavy is imported until a
subcommand runs).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

COMMANDS = {
    "train": ("launch.train", "run GRPO (or SFT) training from a YAML recipe"),
    "eval": ("launch.evaluate", "GSM8K accuracy of a model or adapter checkpoint"),
    "score": ("launch.score", "score a model and write a LoRA PlacementPlan"),
    "reward": ("launch.reward", "try reward functions on a file of completions"),
    "regime": ("launch.regime", "SFT-versus-GRPO gradient regime contrast report"),
    "compare": ("launch.compare", "compare placements under one budget"),
    "stability": ("launch.stability", "PAGE's dominant module over probe sets and checkpoints"),
    "learn": ("launch.learn", "GSM8K learning run: base accuracy, budgeted GRPO arms, report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: placerl <command> [args]\n\ncommands:")
        for name, (_, about) in available.items():
            print(f"  {name:<8} {about}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in available:
        print(f"placerl: unknown command {name!r}; choose one of {', '.join(available)}", file=sys.stderr)
        return 2
    module = importlib.import_module(available[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
