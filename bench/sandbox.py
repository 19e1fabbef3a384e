"""The code sandbox's executions per second (rlfleet/sandbox.py), sequential and from a few threads.

    .venv/bin/python bench/sandbox.py [--runs N]

Each execution is one :meth:`Sandbox.run` of a passing reference solution of the built-in code task against its
tests (a launcher interpreter, user/mount/PID/IPC/network namespaces, read-only remounts, a tmpfs working directory,
then a second ``python -I -S`` interpreter on the program). ``per_s`` = executions / wall time; ``ms_p50`` = median
latency of one execution as its caller sees it. The figures depend on the cores free: with T threads on C cores
the rate stops growing near T = C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlfleet.code_task import PROBLEMS  # noqa: E402
from rlfleet.sandbox import Sandbox  # noqa: E402


def measure(sandbox: Sandbox, runs: int, threads: int) -> dict:
    problems = [PROBLEMS[i % len(PROBLEMS)] for i in range(runs)]

    def one(problem) -> float:
        start = time.monotonic()
        result = sandbox.run(problem.reference, problem.tests)
        assert result.passed, result.output
        return time.monotonic() - start

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        latencies = list(pool.map(one, problems))
    wall = time.monotonic() - start
    return {"threads": threads, "runs": runs, "per_s": runs / wall, "ms_p50": 1000 * statistics.median(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    sandbox = Sandbox()
    sandbox.check()
    print(f"cores: {os.cpu_count()}  interpreter in the sandbox: {sandbox.python}")
    for threads in (1, 2, 4):
        row = measure(sandbox, args.runs, threads)
        print(f"threads {row['threads']}: {row['per_s']:.1f} executions/s, median {row['ms_p50']:.0f} ms "
              f"({row['runs']} runs)")


if __name__ == "__main__":
    main()
