"""The `spectra` command line. Each module below registers its subcommands; they parse arguments and call a
library function, nothing more. Heavy imports happen inside the command, so `spectra --help` is fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's or `kill`'s stop), raised where the command is so that its writers remove their
    temporaries and it ends in one line, as Ctrl-C does (the default action killed the process on the spot, leaving a
    model-sized temporary folder behind)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        print("spectra: interrupted", file=sys.stderr)
        return 130
    if unknown:
        _refuse_unknown(parser, args, unknown)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    # `spectra serve` keeps the default: uvicorn shuts down gracefully on SIGTERM and then re-raises it, so that the
    # server ends as killed by SIGTERM (what systemd and the tests count as a clean stop), not with exit 143
    ours = args.command != "serve" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if ours else None
    try:
        code = int(args.func(args) or 0)
    except (ValueError, OSError, ImportError) as e:
        print(f"spectra {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line (outputs are written atomically, a run resumes)
        print(f"spectra {args.command}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}",
              file=sys.stderr)
        code = 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        _exit_now(code)
    return code


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """argparse's error for arguments no command takes; for `train`'s `--model.FIELD` / `--train.FIELD` it lists the
    fields there are (argparse would print only the top-level usage)."""
    dotted = [u for u in unknown if u.startswith(("--model.", "--train."))]
    if dotted and getattr(args, "command", None) == "train":
        import dataclasses

        from spectra.config import ModelConfig
        from spectra.train.config import TrainConfig

        option = dotted[0].split("=", 1)[0]
        section = option[2:].split(".", 1)[0]
        fields = sorted(f.name for f in dataclasses.fields(ModelConfig if section == "model" else TrainConfig))
        if section == "model":
            fields.append("size")
        parser.exit(2, f"spectra train: error: unknown option {option}; accepted --{section}.FIELD with FIELD one of "
                       f"{', '.join(sorted(fields))}\n")
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")


def _exit_now(code: int) -> None:
    """Leave a torchrun worker without the interpreter's teardown. The command has finished (a training run has
    written its result and destroyed its process group), yet a 2-process gloo run on CPU now and then aborted while
    the interpreter shut down ("terminate called without an active exception", then "Fatal Python error: Aborted"
    with no Python frame, rank 1, after result.json and the final model were written: 1 of 20 runs of
    tests/test_train_dist.py, and twice in clean-clone CI), and torchrun then reported the whole run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
