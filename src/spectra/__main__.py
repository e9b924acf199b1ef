"""The `spectra` command line. Each module below registers its subcommands; they parse arguments and call a
library function, nothing more. Heavy imports happen inside the command, so `spectra --help` is fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

CLI_MODULES = [
    "spectra.cli",
    "spectra.packed.cli",
    "spectra.inference.cli",
    "spectra.serve.cli",
    "spectra.ptq.cli",
    "spectra.analysis.cli",
    "spectra.data.cli",
    "spectra.train.cli",
    "spectra.suite.cli",
    "spectra.eval.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectra",
        description="Pretrain, quantize, pack, run and compare FloatLMs, TriLMs and QuantLMs "
        "(Spectra, arXiv 2407.12327).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in CLI_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        result = args.func(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"spectra {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
