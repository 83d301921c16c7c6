"""Speed against plain PyTorch, and how tlmodules uses the hardware: every figure of issue 7 in one table.

Each figure runs in its own process (so its peak resident memory is its own) with torch's thread count
fixed by ``--threads``; inside, the variants it compares alternate over ``--repeats`` rounds and the figure is
a ratio of medians (``bench/timing.py``). Run on an otherwise idle machine.

    python bench/speed.py --threads 1                      # every figure, CPU
    python bench/speed.py --figures dann_step_ratio        # some figures
    python bench/speed.py --device cuda --figures bf16_speedup finetune_overhead_image

Writes ``bench/results/speed[_<device>].json`` (``{"figures": {name: result}, ...}``) and a markdown table
beside it. A result holds ``value`` (the ratio), ``goal``, ``met``, ``threads``, ``peak_rss_mib``, ``seconds``,
the figure's ``details`` and its ``stamp`` (date, commit, CPU model, torch). A run of some figures replaces
those figures only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import peak_rss_mib, set_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

FIGURES: dict[str, str] = {  # figure name: "module:function" (function(args) -> result dict)
    "finetune_overhead_image": "bench.speed_overhead:finetune_overhead_image",
    "finetune_overhead_text": "bench.speed_overhead:finetune_overhead_text",
    "probe_cache_speedup_10_epochs": "bench.speed_probe:probe_cache_speedup",
    "dann_step_ratio": "bench.speed_dann:dann_step_ratio",
    "dann_step_ratio_resnet": "bench.speed_dann:dann_step_ratio_resnet",
    "bf16_speedup": "bench.speed_text:bf16_speedup",
    "loader_throughput_images": "bench.speed_data:loader_throughput_images",
    "loader_throughput_text": "bench.speed_data:loader_throughput_text",
    "length_grouped_speedup": "bench.speed_text:length_grouped_speedup",
    "probe_extraction_vs_sentence_transformers": "bench.speed_extraction:probe_extraction_vs_sentence_transformers",
}


def run_figure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """In this process: fix the threads, run the figure, add its thread count, memory, wall time and stamp."""
    threads = set_threads(args.threads)
    module, function = FIGURES[name].split(":")
    start = time.perf_counter()
    result = getattr(importlib.import_module(module), function)(args)
    result.update(threads=threads, peak_rss_mib=round(peak_rss_mib(), 1), seconds=round(time.perf_counter() - start, 1))
    result.setdefault("device", args.device)
    result["stamp"] = stamp()
    return result


def stamp() -> dict[str, Any]:
    """Where and when a figure was measured: date, commit (``+`` when the tree had changes), CPU model, torch."""
    import torch

    root = Path(__file__).resolve().parents[1]

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, timeout=10)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+"
    cpu_model = None
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu_model = names[0] if names else None
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "cpu_model": cpu_model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def in_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one figure in a fresh Python process and read back its result."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        command = [
            sys.executable, __file__, "--child", name, "--child-output", str(out), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--device", args.device, *(["--quick"] if args.quick else []),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0 or not out.exists():
            return {"error": f"exit status {completed.returncode}", "met": False}
        return json.loads(out.read_text())


def table(figures: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| figure | value | goal | met | threads | peak RSS (MiB) | seconds | device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in figures.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | no | | | | |")
            continue
        lines.append(
            f"| {name} | {r['value']:.2f} | {r['goal']} | {'yes' if r['met'] else 'no'} | {r['threads']} "
            f"| {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} | {r['device']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for every figure")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per figure (median taken)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="a few steps of each: checks the script, no figures")
    parser.add_argument("--output", default=None, help="default: bench/results/speed[_cuda].json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        Path(args.child_output).write_text(json.dumps(run_figure(args.child, args), indent=2))
        return
    figures = {}
    for name in args.figures:
        print(f"== {name}", flush=True)
        figures[name] = in_child(name, args)
        print(json.dumps(figures[name], indent=2), flush=True)
    import torch

    report = {
        "threads": args.threads,
        "repeats": args.repeats,
        "device": args.device,
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "figures": figures,
    }
    default = RESULTS / ("speed.json" if args.device == "cpu" else f"speed_{args.device}.json")
    output = Path(args.output) if args.output else default
    if args.output or not args.quick:
        previous = json.loads(output.read_text()) if output.exists() else {}
        if previous.get("figures") and set(figures) != set(FIGURES):
            # a partial run updates its figures only (each carries its own stamp); the header stays the full run's
            report = {**previous, "figures": {**previous["figures"], **figures}}
        output.write_text(json.dumps(report, indent=2))
        output.with_suffix(".md").write_text(table(report["figures"]))
    print(table(figures))


if __name__ == "__main__":
    main()
