"""The one dispatch table: `zeroconv <command> [options]` -> `module:function(argv) -> exit code`.

Command modules are imported only when their command runs, so `zeroconv --help` is instant and one
command's heavy imports never slow another. A UserError anywhere becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from zeroconv.errors import EXIT_USER_ERROR, UserError

# command -> (module:function, one-line summary). The flow of data reads top to bottom.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("zeroconv.data.synth:main", "write a synthetic dataset (Fill50K-compatible circles)"),
    "prepare": ("zeroconv.data.prepare:main", "photos -> dataset: compute conditions and captions"),
    "cache": ("zeroconv.train.cache:main", "precompute latents, text embeddings and conditions"),
    "init": ("zeroconv.models.init:main", "base SD model -> initial ControlNet (tool_add_control in one command)"),
    "train": ("zeroconv.train.run:main", "train a ControlNet (flags of diffusers' train_controlnet.py)"),
    "sample": ("zeroconv.sample:main", "generate images with a base + ControlNet from condition images"),
    "eval": ("zeroconv.evaluate.cli:main", "controllability metrics of generated images"),
    "report": ("zeroconv.report:main", "one HTML page of runs: a slider over validation grids, loss and metric curves"),
    "export": ("zeroconv.export:main", "ControlNet -> A1111/ComfyUI single file or diffusers folder"),
    "import": ("zeroconv.export:import_main", "original-layout single file -> diffusers folder"),
    "push": ("zeroconv.export:push_main", "upload a trained ControlNet, card and grids to the Hub"),
    "toy-base": ("zeroconv.models.toy_base:main", "train (or locate) the small toy SD base zeroconv ships"),
    "demo": ("zeroconv.demo:main", "the Fill50K sanity check on the toy base, offline, in minutes"),
    "bench": ("zeroconv.bench:main", "training speed and memory benchmark"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: zeroconv <command> [options]   (zeroconv <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(command: str):
    target, _ = COMMANDS[command]
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def quiet_torchvision_notice() -> None:
    """zeroconv does not use torchvision (its wheel does not import beside the CPU torch these machines install);
    transformers says so on every pipeline load. Drop that one notice, nothing else."""
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_torchvision_notice()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from zeroconv import __version__

        print(f"zeroconv {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"zeroconv: error: unknown command '{command}'{hint}\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(resolve(command)(rest) or 0)
    except UserError as exc:
        print(f"zeroconv {command}: error: {exc}", file=sys.stderr)
        if os.environ.get("ZEROCONV_DEBUG"):
            raise
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
