"""``python -m bench compare OLD.json NEW.json``: fail when a benchmark got slower.

Two measures of each benchmark are compared between the reports:

- absolute: NEW median / OLD median. Meaningful only on the same machine.
- relative: the backend's median divided by the reference backend's median
  of the same benchmark *in the same run*, NEW over OLD. Machine speed and
  load cancel out, so reports from different machines can be compared.

``--statistic min`` compares the fastest samples instead of the medians:
load from other processes only ever adds time, so minima are steadier on a
busy machine.

A fastconv backend is a regression when a judged measure exceeds ``--factor``
(the reference is judged on the absolute measure only). PyTorch rows are
shown but never judged: they are the yardstick, not the code under test.
A benchmark that failed in NEW counts as a regression.
Exit status: 0 no regression, 1 regressions, 2 unusable input.
"""
import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Optional

from bench.markdown import REFERENCE, format_seconds
from bench.report import SCHEMA

# schema 1 (one process for everything) has the same result records
READABLE_SCHEMAS = (1, SCHEMA)
# keys of the machine facts that must agree for absolute times to be comparable
SAME_MACHINE_KEYS = ("cpu_model", "logical_cpus", "cpus_available", "fastconv_threads")


class InputError(Exception):
    pass


def load(path):
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read report {path}: {exc}") from None
    if not isinstance(report, dict) or report.get("schema") not in READABLE_SCHEMAS or "results" not in report:
        raise InputError(f"{path} is not a report written by `python -m bench` (schema {SCHEMA})")
    return report


def _index(report):
    """The benchmarks that were measured, by (id, dtype, impl); failed ones are left out."""
    return {(r["id"], r["dtype"], r["impl"]): r for r in report["results"] if "error" not in r}


def _failed(report):
    return sorted((r["id"], r["dtype"], r["impl"]) for r in report["results"] if "error" in r)


def _relative(index, key, stat):
    """Time relative to the reference's in the same run, for fastconv backends other than the reference."""
    record = index[key]
    if record["impl_kind"] != "backend" or record["impl"] == REFERENCE:
        return None
    reference = index.get((key[0], key[1], REFERENCE))
    return None if reference is None else record[stat] / reference[stat]


@dataclass
class Row:
    key: tuple
    old_s: float
    new_s: float
    absolute: float
    relative: Optional[float] = None
    judged: bool = True
    slower: list = field(default_factory=list)  # which judged measures exceed the factor
    faster: bool = False

    @property
    def name(self):
        benchmark, dtype, impl = self.key
        return f"{benchmark} {dtype} {impl}"


def same_machine(old, new):
    return all(old["machine"].get(k) == new["machine"].get(k) for k in SAME_MACHINE_KEYS)


def compare(old, new, factor, judge="auto", statistic="median"):
    """Rows for every benchmark in both reports; ``judge``: auto, both, relative or absolute."""
    stat = {"median": "median_s", "min": "min_s"}[statistic]
    if judge == "auto":
        judge = "both" if same_machine(old, new) else "relative"
    measures = {"both": ("absolute", "relative"), "relative": ("relative",), "absolute": ("absolute",)}[judge]
    old_index, new_index = _index(old), _index(new)
    rows = []
    for key in old_index.keys() & new_index.keys():
        o, n = old_index[key], new_index[key]
        row = Row(key, o[stat], n[stat], n[stat] / o[stat])
        old_rel, new_rel = _relative(old_index, key, stat), _relative(new_index, key, stat)
        if old_rel is not None and new_rel is not None:
            row.relative = new_rel / old_rel
        row.judged = n["impl_kind"] == "backend"
        values = {"absolute": row.absolute, "relative": row.relative}
        if row.judged:
            row.slower = [m for m in measures if values[m] is not None and values[m] > factor]
            row.faster = not row.slower and any(values[m] is not None and values[m] < 1 / factor for m in measures)
        rows.append(row)
    rows.sort(key=lambda r: -max(r.absolute, r.relative or 0))
    missing = sorted(old_index.keys() - new_index.keys())
    added = sorted(new_index.keys() - old_index.keys())
    return rows, judge, missing, added


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _line(row):
    old, new = format_seconds(row.old_s)[0], format_seconds(row.new_s)[0]
    verdict = ("SLOWER (" + ", ".join(row.slower) + ")" if row.slower
               else "faster" if row.faster else "not judged" if not row.judged else "same")
    return (f"  {row.name:<44} {old:>10} -> {new:>10}  abs {_fmt_ratio(row.absolute):>7}"
            f"  rel {_fmt_ratio(row.relative):>7}  {verdict}")


def _describe(path, report):
    m = report["machine"]
    return f"{path}: {report['created']}, {m['cpu_model']}, {m['cpus_available']} CPUs, `{report['command']}`"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the baseline report (JSON from `python -m bench`)")
    p.add_argument("new", help="the report to judge")
    p.add_argument("--factor", type=float, default=1.2,
                   help="a benchmark this many times slower is a regression (default 1.2)")
    p.add_argument("--judge", choices=("auto", "both", "relative", "absolute"), default="auto",
                   help="measures judged; auto: both on the same machine, else relative only")
    p.add_argument("--statistic", choices=("median", "min"), default="median",
                   help="compare medians (default) or fastest samples (steadier on a busy machine)")
    p.add_argument("--all", action="store_true", help="list every benchmark, not only the changed ones")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.factor > 1:
        parser.error("--factor must be greater than 1")
    try:
        old, new = load(args.old), load(args.new)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, judge, missing, added = compare(old, new, args.factor, args.judge, args.statistic)
    print(f"OLD {_describe(args.old, old)}")
    print(f"NEW {_describe(args.new, new)}")
    if not same_machine(old, new):
        print("note: the reports come from different machines or thread counts; absolute times "
              + ("are judged anyway (--judge)." if judge in ("both", "absolute") else "are not judged."))
    print(f"judged: {judge} on the {args.statistic} (abs = NEW/OLD; rel = NEW/OLD of the time relative "
          f"to the reference in the same run); regression factor {args.factor:g}")
    if not rows:
        print("error: the reports have no benchmark in common", file=sys.stderr)
        return 2
    shown = rows if args.all else [r for r in rows if r.slower or r.faster]
    print(f"\n{len(rows)} benchmarks compared; {'all' if args.all else 'changed'}:" if shown
          else f"\n{len(rows)} benchmarks compared; none changed by more than {args.factor:g}x.")
    for row in shown:
        print(_line(row))
    for label, keys in (("missing from NEW", missing), ("only in NEW", added)):
        if keys:
            print(f"\nwarning: {len(keys)} benchmarks {label}, not compared: "
                  + ", ".join(" ".join(k) for k in keys[:8]) + (" ..." if len(keys) > 8 else ""))
    failed = _failed(new)
    if failed:
        print(f"\nFAILED in NEW ({len(failed)}): " + ", ".join(" ".join(k) for k in failed))
    regressions = [r for r in rows if r.slower]
    if not regressions and not failed:
        print(f"\nOK: no benchmark is more than {args.factor:g}x slower.")
        return 0
    bar = "!" * 78
    print(f"\n{bar}\nPERFORMANCE REGRESSION: {len(regressions)} of {len(rows)} benchmarks are more than "
          f"{args.factor:g}x slower" + (f", {len(failed)} failed" if failed else "") + f"\n{bar}")
    for row in regressions:
        print(_line(row))
    for key in failed:
        print(f"  {' '.join(key):<44} FAILED")
    print(bar)
    return 1
