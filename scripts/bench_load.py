"""Benchmark: decoding BUSI into 128x128 arrays, cold (no cache) and warm (cache hit).

Issue 2 asks for a first load of the real BUSI under 15 s on 2 cores and a
second load that is near-instant. This prints both figures and the command that
produced them; results go into docs/PERFORMANCE.md by hand, with date and machine.

    python scripts/bench_load.py --data ../shared/data/busi/Dataset_BUSI_with_GT
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from busi.data.loading import load_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/busi/Dataset_BUSI_with_GT"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="BUSI-layout folder")
    ap.add_argument("--size", type=int, default=128, help="target side in pixels (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each case")
    args = ap.parse_args(argv)
    if not Path(args.data, "benign").is_dir():
        print(f"bench_load: no BUSI-layout data at {args.data}; pass --data", file=sys.stderr)
        return 2
    size = (args.size, args.size)
    cold, warm = [], []
    n = 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            ds = load_dataset(args.data, size=size, cache_dir=cache)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_dataset(args.data, size=size, cache_dir=cache)
            warm.append(time.perf_counter() - t0)
            n = len(ds)
    argv = sys.argv[1:] if argv is None else argv
    print(f"command: python scripts/bench_load.py {' '.join(shlex.quote(a) for a in argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; date {time.strftime('%Y-%m-%d')}")
    print(f"images: {n} at {size[0]}x{size[1]}")
    print(f"cold load (decode + resize + hash, no cache): best {min(cold):.2f} s, "
          f"median {sorted(cold)[len(cold) // 2]:.2f} s over {len(cold)} runs "
          f"({n / min(cold):.0f} images/s)")
    print(f"warm load (cache hit; files still read and hashed): best {min(warm):.2f} s, "
          f"median {sorted(warm)[len(warm) // 2]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
