"""`ilora` entry point: builds the parser from each command module and runs one command.

Conventions shared by every command:

* results printed with ``--json`` are one JSON object on stdout; logs and progress go
  to stderr;
* bad input ends with exit code 2 and a one-line ``error: ...`` on stderr; ``--debug``
  prints the traceback before that line (the exit code stays 2). Bad input is an
  `IloraError`, or an ``OSError`` from the file system (a path that is not a directory,
  a full disk, no permission: the message names the path); any other exception is a bug
  and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback

from ilora import __version__
from ilora.errors import IloraError

# Each module exposes `register(subparsers)`; the order is the order in --help.
COMMAND_MODULES = ("ilora.cli.data", "ilora.cli.rec", "ilora.cli.teacher", "ilora.cli.distill", "ilora.cli.run", "ilora.cli.demo", "ilora.cli.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ilora",
        description="Instance-wise LoRA (iLoRA) teachers for sequential recommendation, distilled into SASRec.",
    )
    parser.add_argument("--version", action="version", version=f"ilora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not built yet
                continue
            raise
        module.register(sub)
    return parser


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*=")


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``argv`` names (``rec train`` -> its own), for its usage line."""
    for token in argv:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is None:
            break
        if token in commands.choices:
            parser = commands.choices[token]
        elif not token.startswith("-"):
            break
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may stand anywhere after the command."""
    args, unknown = parser.parse_known_args(argv)
    extra = [tok for tok in unknown if OVERRIDE.match(tok)]
    rest = [tok for tok in unknown if not OVERRIDE.match(tok)]
    if rest or (extra and not hasattr(args, "overrides")):
        command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(rest or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def _one_line(exc: BaseException) -> str:
    """The error message on one line (embedded newlines, e.g. from a library, become spaces)."""
    text = str(exc) if str(exc) else type(exc).__name__
    return " ".join(text.split())


def refuse_unsupported_torchrun(args: argparse.Namespace, command: str) -> None:
    """Under torchrun (WORLD_SIZE > 1) only commands that set ``distributed=True`` may run:
    any other would run as N independent copies writing into the same output."""
    from ilora.distributed import launched_by_torchrun

    if launched_by_torchrun() and not getattr(args, "distributed", False):
        raise IloraError(
            f"`{command}` does not run data-parallel; under torchrun only `teacher train`, `teacher eval` and "
            "`teacher export` do (start other commands as one process)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # taken anywhere on the line, as the top-level option it is
        argv = ["--debug"] + [arg for arg in argv if arg != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        refuse_unsupported_torchrun(args, command_parser(parser, argv).prog)
        result = args.run(args)
    except (IloraError, OSError) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
