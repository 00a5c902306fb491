"""Wall time and peak memory of `lc-onnx fuse` against onnxslim and onnxsim on the same model.

Each tool runs as its own child process from the command line, exactly as a user would start it (so
interpreter start-up and imports count for everyone), several times, in interleaved order (rotated each round). Wall time is
measured around the child; peak memory is the child's maximum resident set size as the kernel reports it
to `os.wait4` (`ru_maxrss`, the whole process tree's peak is not included: none of these tools forks
workers). `lc-onnx fuse` runs with its default verification in onnxruntime.

    python tools/make_models.py --models vit_b16 --no-fuse
    python tools/bench_fuse.py out/models/vit_b16.onnx --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

BIN = Path(sys.executable).parent


def commands(model: Path, out: Path) -> dict[str, list[str]]:
    return {
        "lc-onnx fuse": [str(BIN / "lc-onnx"), "fuse", str(model), "-o", str(out / "lc.onnx")],
        "onnxslim": [str(BIN / "onnxslim"), str(model), str(out / "slim.onnx")],
        "onnxsim": [str(BIN / "onnxsim"), str(model), str(out / "sim.onnx")],
    }


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), peak RSS MiB) of one child process; raises if it fails.

    CPU seconds are what the tool costs whatever else runs on the machine; wall time also counts the
    time it waited for a core, so on a shared machine it is noisier.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("out/bench/fuse_tools.json"))
    args = parser.parse_args(argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)

    samples: dict[str, list[tuple[float, float, float]]] = {}
    loads = []
    with tempfile.TemporaryDirectory(dir=args.json.parent) as tmp:
        cmds = commands(args.model, Path(tmp))
        for i in range(args.runs):
            # Rotate the order each round so no tool always runs first (cold page cache) or last.
            names = list(cmds)[i % len(cmds) :] + list(cmds)[: i % len(cmds)]
            for name in names:
                loads.append(os.getloadavg()[0])
                wall, cpu, rss = measure(cmds[name])
                samples.setdefault(name, []).append((wall, cpu, rss))
                print(
                    f"run {i + 1}/{args.runs} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                    f"peak RSS {rss:.0f} MiB (load {loads[-1]:.2f})",
                    file=sys.stderr,
                )

    med = {
        name: tuple(statistics.median(sample[j] for sample in s) for j in range(3))
        for name, s in samples.items()
    }
    lc_time, lc_cpu, lc_mem = med["lc-onnx fuse"]
    versions = {
        "lc-onnx fuse": version("lc-onnx"),
        "onnxslim": version("onnxslim"),
        "onnxsim": version("onnxsim"),
    }
    lines = [
        f"`{args.model.name}` ({args.model.stat().st_size / 2**20:.0f} MiB), {args.runs} runs each, medians; "
        f"{os.cpu_count()} CPU cores, 1-minute load average {min(loads):.2f} to {max(loads):.2f} "
        "before the runs.",
        "",
        "| tool | version | wall s | CPU s | peak RSS MiB | lc-onnx wall / this | lc-onnx CPU / this "
        "| lc-onnx memory / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (wall, cpu, rss) in med.items():
        lines.append(
            f"| {name} | {versions[name]} | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {lc_time / wall:.2f} "
            f"| {lc_cpu / cpu:.2f} | {lc_mem / rss:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    record = {
        "model": str(args.model),
        "runs": args.runs,
        "versions": versions,
        "load_average_1m": loads,
        "samples": {
            k: [{"wall_s": w, "cpu_s": c, "peak_rss_mib": m} for w, c, m in v] for k, v in samples.items()
        },
        "median": {k: {"wall_s": w, "cpu_s": c, "peak_rss_mib": m} for k, (w, c, m) in med.items()},
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
