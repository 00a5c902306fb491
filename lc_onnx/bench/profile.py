"""Where a run's time goes, per operator type, from onnxruntime's own profiler.

The ideal speedup assumes time proportional to multiply-accumulates. Ops that a collapse does not shrink
(attention products, softmax, LayerNorm, transposes, elementwise adds) keep their time, which is why the
realized speedup falls short of it; this module measures those shares on the optimised graph that
onnxruntime actually runs (so fused kernels such as `FusedMatMul` appear under their own names).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["SHRINKING_OPS", "profile_op_times"]

# Kernels whose cost a collapse can reduce: the matrix products and convolutions.
SHRINKING_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv", "MatMulNBits"})


def profile_op_times(
    path: Path, feeds: Mapping[str, np.ndarray], provider: str, threads: int, runs: int = 10
) -> dict[str, float]:
    """Mean milliseconds per run spent in each operator type, plus `"total"` for the whole run.

    Args:
        path: the model file.
        feeds: inputs, as from `make_feeds`.
        provider: `cpu` or `cuda`.
        threads: intra-op threads (the benchmark's setting).
        runs: runs averaged over; one more warm-up run comes first and is left out.

    Returns:
        Op type -> ms per run, sorted by time, descending; `"total"` is the mean `model_run` time.
    """
    from lc_onnx.bench.runner import make_session

    with tempfile.TemporaryDirectory(prefix="lc-onnx-profile-") as tmp:
        session = make_session(path, provider, threads, profile_prefix=str(Path(tmp) / "prof"))
        names = [o.name for o in session.get_outputs()]
        for _ in range(runs + 1):
            session.run(names, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())

    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    # The first model_run is the warm-up: drop every node event that ended before it did.
    warm_end = run_ends[0] if run_ends else 0
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event["ts"] + event["dur"] <= warm_end:
            continue
        totals[event.get("args", {}).get("op_name", "?")] += event["dur"]
    run_durs = [e["dur"] for e in events if e.get("name") == "model_run"][1:]
    measured = max(len(run_durs), 1)
    result = {op: us / 1000.0 / measured for op, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    result["total"] = float(np.mean(run_durs)) / 1000.0 if run_durs else sum(result.values())
    return result
