"""`spectra suite` and `spectra report`."""

from __future__ import annotations

import argparse
import json


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suite", help="reproduce the Spectra study: train, quantize, pack, evaluate, fit, report")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help="tiny (default), small, medium, paper, ablations-tiny, ablations-small, micro, qat-tiny")
    src.add_argument("--spec", default=None, help="a suite spec TOML file")
    p.add_argument("--out", default=None, help="output folder (default: runs/suite-PRESET)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [suite] key, e.g. --set sizes='[\"tiny\"]' --set tokens=1e5",
    )
    p.add_argument("--jobs", default="auto", metavar="N|auto",
                   help="steps run side by side on CPU, each in its own process with its share of the cores "
                        "(default auto: one per core, at most 4; 1 on a GPU or under torchrun)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_suite_cmd)

    p = sub.add_parser("report", help="rebuild a suite's report from its results.jsonl")
    p.add_argument("results", help="results.jsonl or the suite's output folder")
    p.add_argument("--out", default=None, help="report folder (default: next to the results, report/)")
    p.set_defaults(func=run_report_cmd)


def run_suite_cmd(args: argparse.Namespace) -> int:
    from spectra.suite import load_spec, run_suite

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _value(value)
    preset = args.preset or (None if args.spec else "tiny")
    spec = load_spec(preset=preset, path=args.spec, overrides=overrides)
    out = args.out or f"runs/suite-{spec.name}"
    result = run_suite(spec, out, progress=not args.no_progress, jobs=args.jobs)
    steps = result["steps"]
    code = 1 if steps["failed"] or steps["blocked"] else 0
    if result.get("rank", 0) != 0:  # under torchrun rank 0 alone reports
        return code
    print(
        f"\nsuite {spec.name}: {steps['done']} steps done, {steps['skipped']} already done, {steps['failed']} failed, "
        f"{steps['blocked']} blocked, {result['seconds']:.0f} s"
        + (f" ({result['jobs']} steps side by side, {result['threads_per_job']} thread(s) each)"
           if result["jobs"] > 1 else "")
    )
    if "report" in result:
        print(result["report"]["summary_table"])
        print(f"\nreport: {result['report']['html']}\n        {result['report']['markdown']}")
    return code


def run_report_cmd(args: argparse.Namespace) -> int:
    from spectra.suite import build_report

    report = build_report(args.results, args.out)
    print(report["summary_table"])
    print(f"\nreport: {report['html']}\n        {report['markdown']}")
    return 0
