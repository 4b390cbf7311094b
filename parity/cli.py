"""``rtdetr-parity``: check, convert and benchmark from the shell.

    rtdetr-parity check --variant r18vd [--weights W] [--size 640] [--out reports/out]
    rtdetr-parity convert SRC DST --variant r50vd
    rtdetr-parity bench
    rtdetr-parity memory [--steps 200]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from rtdetr_common.configs import VARIANTS
from rtdetr_common.weights import atomic_write


def _write_results(result, out_dir: Path) -> tuple[Path, Path]:
    """Writes the rows of a check as CSV and the whole result as JSON, atomically."""
    from .tolerances import table_rows

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": r.kind, **r.comparison.as_row(),
             "precision_floor": result.precision_floor.get(r.comparison.path, "")}
            for r in result.rows]
    csv_path = out_dir / f"check_{result.variant}.csv"
    json_path = out_dir / f"check_{result.variant}.json"

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(csv_path, write_csv)
    payload = {"variant": result.variant, "weights": result.weights, "size": result.size,
               "passed": result.passed, "notes": result.notes, "seconds": result.seconds,
               "precision_floor": result.precision_floor,
               "tolerances": table_rows(), "rows": rows}
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str)))
    return csv_path, json_path


def format_check(result) -> str:
    """The compact table: module path, kind, max abs, rel L2, cosine, status."""
    head = f"{'path':44} {'kind':9} {'max abs':>10} {'rel L2':>10} {'cosine':>12} status"
    lines = [head, "-" * len(head)]
    for r in result.rows:
        c = r.comparison
        status = "ok" if c.passed else f"FAIL: {c.reason}"
        if c.path in result.precision_floor:
            status += f" (fp32 floor {result.precision_floor[c.path]:.2g})"
        lines.append(f"{c.path[:44]:44} {r.kind:9} {c.max_abs:>10.3g} {c.rel_l2:>10.3g} "
                     f"{c.cosine:>12.9f} {status}")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check
    from .models import build_pair

    pair = build_pair(args.variant, num_classes=args.num_classes, size=args.size,
                      weights=args.weights, seed=args.seed)
    result = run_check(pair, args.size, train_size=args.train_size)
    print(f"rtdetr-parity check: variant {result.variant}, weights {result.weights}, "
          f"eval {args.size}x{args.size}, train {args.train_size}x{args.train_size}")
    print(format_check(result))
    for note in result.notes:
        print(f"note: {note}")
    csv_path, json_path = _write_results(result, Path(args.out))
    failed = sum(not r.passed for r in result.rows)
    print(f"{len(result.rows) - failed} passed, {failed} failed  (results: {csv_path}, {json_path})")
    return 0 if result.passed else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    ws = convert(args.src, args.dst, args.variant, args.num_classes)
    entries = [e for e in ("model", "ema") if getattr(ws, e) is not None]
    print(f"wrote {args.dst}: {', '.join(entries)} ({len(ws.preferred()[0])} tensors each)")
    if ws.dropped:
        print(f"not carried over (framework-specific training state): {', '.join(ws.dropped)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import DEFAULT_SPECS, format_rows, run_bench

    rows = run_bench(DEFAULT_SPECS, warmup=args.warmup, reps=args.reps)
    print(format_rows(rows))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from .bench import jittor_memory_growth

    steps = (args.first, args.steps)
    rows = jittor_memory_growth(args.variant, args.size, args.batch, steps)
    for r in rows:
        print(f"jittor {args.variant} {args.size}x{args.size} batch {args.batch}: step {r['step']:>5}"
              f"  rss {r['rss_mb']:8.1f} MiB (untrimmed {r['rss_untrimmed_mb']:8.1f})"
              f"  live Vars {r['lived_vars']}")
    growth = rows[-1]["rss_mb"] / rows[0]["rss_mb"] - 1
    ok = abs(growth) <= args.limit and rows[-1]["lived_vars"] == rows[0]["lived_vars"]
    print(f"memory step {args.steps} vs step {args.first}: {growth * 100:+.2f}% "
          f"(limit {args.limit * 100:.0f}%), live Vars {rows[0]['lived_vars']} -> "
          f"{rows[-1]['lived_vars']}: {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(prog="rtdetr-parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="parity of one variant: outputs, detections, losses")
    check.add_argument("--variant", default="r18vd", choices=list(VARIANTS))
    check.add_argument("--weights", default=None,
                       help="official .pth, Jittor .pkl or neutral .safetensors/.npz "
                            "(default: seeded weights in the official layout)")
    check.add_argument("--num-classes", type=int, default=80)
    check.add_argument("--size", type=int, default=640, help="eval input size")
    check.add_argument("--train-size", type=int, default=640,
                       help="train-loss check input size (official training size)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--out", default="reports/out", help="folder for CSV/JSON results")
    check.set_defaults(func=cmd_check)

    conv = sub.add_parser("convert", help="convert weights between .pth, .pkl and neutral files")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--variant", required=True, choices=list(VARIANTS))
    conv.add_argument("--num-classes", type=int, default=None,
                      help="expected class count (default: read from the heads)")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="Jittor/PyTorch time and memory ratios, side by side")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--reps", type=int, default=5)
    bench.set_defaults(func=cmd_bench)

    mem = sub.add_parser("memory", help="Jittor training memory at two step counts (graph leaks)")
    mem.add_argument("--variant", default="r18vd", choices=list(VARIANTS))
    mem.add_argument("--size", type=int, default=320)
    mem.add_argument("--batch", type=int, default=2)
    mem.add_argument("--first", type=int, default=20)
    mem.add_argument("--steps", type=int, default=200)
    mem.add_argument("--limit", type=float, default=0.03, help="allowed relative growth")
    mem.set_defaults(func=cmd_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rtdetr-parity`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"rtdetr-parity {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
