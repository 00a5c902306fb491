"""The `lc-onnx` command line.

Each subcommand lives in its own module under `lc_onnx.commands`, which defines `add_arguments(parser)`
and `run(args) -> int`; the module docstring is the subcommand's `--help`. The library's errors name
parameters (`max_batch_size`); here they are spelled as the flags that set them (`--max-batch-size`):
a module may map parameters to flags in `FLAGS` where the spelling is not the plain one. Modules import their heavy
dependencies (onnxruntime, torch) inside `run`, so `lc-onnx --help` stays fast and the graph side works
without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Mapping, Sequence

from lc_onnx.errors import UserError

# Subcommand name -> module under lc_onnx.commands, in the order `--help` lists them.
COMMANDS = {
    "fuse": "fuse",
    "inspect": "inspect",
    "demo": "demo",
    "calibrate": "calibrate",
    "bench": "bench",
    "deploy": "deploy",
    "finetune": "finetune",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"lc_onnx.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lc_onnx.commands.{module}":
                raise
    return modules


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2 (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lc-onnx",
        description="LayerCollapse for ONNX: collapse Linear -> (near-)linear activation -> Linear "
        "into one linear layer, verified in onnxruntime.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _available_commands().items():
        doc = (module.__doc__ or "").strip()
        summary = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".") if doc else name
        p = sub.add_parser(
            name,
            help=summary,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p, _flags=getattr(module, "FLAGS", {}))
    return parser


def flag_names(params: Sequence[str], flags: Mapping[str, str]) -> dict[str, str]:
    """How the command line spells each parameter: `flags[p]`, else `--p-with-dashes`."""
    return {p: flags.get(p, "--" + p.replace("_", "-")) for p in params}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 verification failed, 2 bad input)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the message names the command (exit 2)
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(
            f"lc-onnx {args.command}: error: {exc.render(flag_names(exc.params, args._flags))}",
            file=sys.stderr,
        )
        return exc.exit_code
    except KeyboardInterrupt:
        print("lc-onnx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
