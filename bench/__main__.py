"""Run the benchmarks and print one table: `python -m bench` (all) or `python -m bench P1 P7`.

Each benchmark measures its baseline in the same run and reports the ratio; see bench/RESULTS.md
for the latest figures and the machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import Row

# In the priority order; each imports its own heavy parts only when it runs.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "P1": ("bench.latency", "p1_uploaded_to_destroy"),
    "P2": ("bench.host_exit", "p2_host_exit_to_next_allocation"),
    "P3": ("bench.latency", "p3_relay_throughput"),
    "P7": ("bench.runner", "p7_runner_overhead"),
    "P5": ("bench.runner", "p5_runner_setup"),
    "P4": ("bench.zip_memory", "p4_zip_throughput"),
    "P8": ("bench.demo", "p8_demo_wall_time"),
    "P6": ("bench.scale", "p6_concurrent_runs"),
    "P9": ("bench.resume", "p9_gpu_time_lost_to_a_host_failure"),
    "P10": ("bench.budget", "p10_events_per_run_hour"),
}
COLUMNS = ("id", "what", "figure", "compared with", "ratio", "target", "verdict")


def run_one(benchmark_id: str) -> Row:
    module_name, function_name = BENCHMARKS[benchmark_id]
    try:
        module = __import__(module_name, fromlist=[function_name])
        function: Callable[[], Row] = getattr(module, function_name)
        return function()
    except Exception as e:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        return Row(benchmark_id, module_name, "-", "-", "-", "-", None, f"failed: {e}")


def table(rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal and pasteable into RESULTS.md."""
    cells = [COLUMNS] + [
        (r.id, r.what, r.figure, r.compared, r.ratio, r.target, r.verdict) for r in rows
    ]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(COLUMNS))
    notes = [f"- {r.id}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def machine() -> str:
    """What the figures ran on, for RESULTS.md."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    memory = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} CPUs ({cpu})\n{memory}"


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", metavar="ID", help=f"any of {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    unknown = [i for i in args.ids if i.upper() not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})")
    ids = [i.upper() for i in args.ids] or list(BENCHMARKS)
    with tempfile.TemporaryDirectory(prefix="bench-state-") as state:
        # Never read or write the user's own `loratrain dev` state.
        os.environ["LORA_STATE_DIR"] = state
        run_and_print(ids)


def run_and_print(ids: list[str]) -> None:
    # The servers the benchmarks start print banners on stdout: keep stdout for the table.
    table_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    load_at_start = load_average()
    rows = []
    for benchmark_id in ids:
        started = time.monotonic()
        print(f"{benchmark_id} ...", file=sys.stderr, flush=True)
        rows.append(run_one(benchmark_id))
        print(f"{benchmark_id} done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(table(rows), file=table_out)
    print(
        f"\nload average (1, 5, 15 min) at the start: {load_at_start}, at the end:"
        f" {load_average()}\n{machine()}",
        file=table_out,
    )
    table_out.flush()


if __name__ == "__main__":
    main()
