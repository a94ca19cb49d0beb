"""Long fuzzing runs: `.venv/bin/python tests/fuzz/run_fuzz.py --seconds 3600 [harness ...]`.

Findings are written to tests/fuzz/findings/<harness>-<n>.bin with the problem in a .txt beside it;
turn each into a named regression test."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_harnesses import HARNESSES, fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("harness", nargs="*", help=f"any of {', '.join(HARNESSES)} (default: all)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per harness (default: 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = sorted(set(args.harness) - set(HARNESSES))
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(HARNESSES)}")
    out = Path(__file__).resolve().parent / "findings"
    failed = False
    for name in args.harness or list(HARNESSES):
        report = fuzz(HARNESSES[name], seconds=args.seconds, seed=args.seed)
        print(f"{name:14s} {report.runs:7d} runs  {report.rejected:7d} rejected  {report.accepted:6d} accepted  "
              f"{len(report.findings)} findings")
        for i, finding in enumerate(report.findings):
            out.mkdir(exist_ok=True)
            (out / f"{name}-{i}.bin").write_bytes(finding.data)
            (out / f"{name}-{i}.txt").write_text(finding.problem + "\n")
            print(f"  {finding.problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
