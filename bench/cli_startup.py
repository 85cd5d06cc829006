"""How long `lt --help` takes, start to exit, as a user's shell runs it.

    python3 bench/cli_startup.py [--runs 20]

Prints the median and best wall time and the bare interpreter's start time for comparison. Runs the
installed `lt` when it belongs to this checkout, else `python -m wrapper` with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.cli_support import lt_command  # noqa: E402


def _timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def measure(runs: int = 20) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [*lt_command(), "--help"]
    _timed(command, env)  # warm the page cache and .pyc files
    times = [_timed(command, env) for _ in range(runs)]
    bare = [_timed([sys.executable, "-c", "pass"], env) for _ in range(max(3, runs // 4))]
    return {"command": " ".join(command), "runs": runs, "median_s": statistics.median(times),
            "best_s": min(times), "python_startup_median_s": statistics.median(bare)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    result = measure(parser.parse_args().runs)
    print(json.dumps(result, indent=2))
    print(f"lt --help: median {result['median_s'] * 1000:.0f} ms, best {result['best_s'] * 1000:.0f} ms "
          f"(python itself: {result['python_startup_median_s'] * 1000:.0f} ms); limit 300 ms")


if __name__ == "__main__":
    main()
