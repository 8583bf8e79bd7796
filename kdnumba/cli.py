"""The ``kdnumba`` command: a thin router over subcommands.

``kdnumba bench``   side-by-side timings (:mod:`kdnumba.benchmarking.runner`)
``kdnumba demo``    end-to-end distillation on real data (:mod:`kdnumba.demo`)
``kdnumba warmup``  compile every kernel ahead of time (:mod:`kdnumba.warmup`)

Each subcommand's module is imported only when that subcommand runs, so
``kdnumba bench`` never imports the demo's dependencies and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_DEMO_MODULE = "kdnumba.demo"


def _load_demo():
    """The demo module, or ``None`` if this installation has none."""
    try:
        return importlib.import_module(_DEMO_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == _DEMO_MODULE:
            return None
        raise


def _subcommand(argv: list[str]) -> str | None:
    """The first argument that is not an option (argparse's choice of subcommand)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(*, demo=None) -> argparse.ArgumentParser:
    """The parser; ``demo`` (the loaded module) adds the demo's own options."""
    from kdnumba import __version__

    parser = argparse.ArgumentParser(
        prog="kdnumba",
        description="Knowledge-distillation losses and exact gradients on Numba.")
    parser.add_argument("--version", action="version", version=f"kdnumba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser(
        "bench", help="time every kernel family against NumPy and PyTorch CPU",
        description="Time every benchmark case with kdnumba, the NumPy reference and "
                    "PyTorch CPU (when installed), on the same inputs in one process, "
                    "and compare with the machine's memory-copy and GEMM bounds.")
    from kdnumba.benchmarking import runner
    runner.add_arguments(bench)

    warmup = sub.add_parser(
        "warmup", help="compile every kernel for float32 and float64 ahead of time",
        description="Compile every registered loss's CPU kernels for both float dtypes, "
                    "in parallel worker processes, into the compilation cache (for "
                    "container images and CI caches).")
    from kdnumba import warmup as warmup_module
    warmup_module.add_arguments(warmup)

    demo_parser = sub.add_parser(
        "demo", help="distil a small NumPy MLP on scikit-learn's digits",
        description="End-to-end distillation with NumPy and kdnumba only.")
    if demo is not None:
        demo.add_arguments(demo_parser)
    return parser


def main(argv=None) -> int:
    """Run the ``kdnumba`` command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = None
    if _subcommand(argv) == "demo":
        demo = _load_demo()
        if demo is None:
            print("kdnumba demo: not available in this installation "
                  f"({_DEMO_MODULE} is missing); try 'kdnumba bench --quick'",
                  file=sys.stderr)
            return 2
    parser = build_parser(demo=demo)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "bench":
            from kdnumba.benchmarking import runner
            return runner.run_from_args(args)
        if args.command == "warmup":
            from kdnumba import warmup as warmup_module
            return warmup_module.run_from_args(args)
        return int(demo.run(args) or 0)
    except BrokenPipeError:  # e.g. `kdnumba bench | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file or folder that cannot be written or read: one line
        print(f"kdnumba {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
