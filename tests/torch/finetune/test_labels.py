from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("sklearn")

from lc_onnx.cli import main  # noqa: E402
from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch.finetune import FinetuneConfig, finetune  # noqa: E402

SMALL_VIT = ["--model-arg", "depth=2", "--model-arg", "embed_dim=16", "--model-arg", "num_heads=2"]
SMALL_VIT += ["--model-arg", "patch_size=4", "--model-arg", "mlp_ratio=2"]


def test_finetune_cli_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", "vit_tiny_patch16_224", *SMALL_VIT, "--epochs", "1", "--fraction", "1.0"]
    # slopes start at 1 and stay there (--slope-lr 0): both blocks are exactly linear
    args += ["--init", "1.0", "--slope-lr", "0", "--out", str(out), "--no-progress", "--img-size", "8"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"config", "accuracy", "blocks", "params", "macs", "fuse", "seconds"}
    acc = report["accuracy"]
    assert set(acc) == {"start", "before_collapse", "after_collapse_torch", "after_collapse_onnxruntime"}
    assert all(0.0 <= v <= 100.0 for v in acc.values())
    # the last epoch leaves the collapse to the end, where torch and the graph pass (on the export)
    # collapse both blocks
    blocks = report["blocks"]
    assert (blocks["total"], blocks["collapsed"], blocks["collapsed_during_training"]) == (2, 2, [])
    assert blocks["collapsed_at_end"] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert blocks["collapsed_by_graph_pass"] == 2
    assert blocks["not_collapsed"] == {}
    # slopes exactly 1: collapsing changes outputs by float rounding only (allow one test image whose top
    # two logits tie that closely), and the graph pass agrees with torch
    one = 100 / 360 + 1e-9
    assert acc["after_collapse_torch"] == pytest.approx(acc["before_collapse"], abs=one)
    assert acc["after_collapse_onnxruntime"] == pytest.approx(acc["after_collapse_torch"], abs=one)
    # 2 blocks of 16 -> 32 -> 16 become 16 -> 16: 2 * ((16*32+32) + (32*16+16) + 1 - (16*16+16)) removed
    assert report["params"]["start"] - report["params"]["after_collapse_torch"] == 2 * (544 + 528 + 1 - 272)
    # in the graph the two equal slope tensors (both exactly 1) are one initializer: the exporter dedups
    onnx_removed = report["params"]["onnx_before_fuse"] - report["params"]["onnx_after_fuse"]
    assert onnx_removed == 2 * (544 + 528 - 272) + 1
    assert report["macs"]["onnx_after_fuse"] < report["macs"]["onnx_before_fuse"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["epoch"] for row in rows] == [1]
    assert set(rows[0]) >= {"train_loss", "train_acc", "test_acc", "penalty", "slopes", "params", "seconds"}
    assert rows[0]["slopes"] == {"blocks.0.mlp.act": 1.0, "blocks.1.mlp.act": 1.0}
    assert rows[0]["penalty"] == 0.0
    onnx = pytest.importorskip("onnx")
    ops = [node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node]
    fused_ops = [node.op_type for node in onnx.load(str(out / "model.collapsed.onnx")).graph.node]
    assert ops.count("PRelu") == 2 and "PRelu" not in fused_ops
    assert {p.name for p in out.iterdir()} >= {
        "model.onnx",
        "model.collapsed.onnx",
        "report.json",
        "checkpoint.pt",
    }
    assert "2/2 MLP blocks collapsed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "no_such_model_xyz"], "--model no_such_model_xyz: not a timm model name"),
        (["--model", "vgg-mlp", "--fraction", "1.5"], "--fraction 1.5: must be in [0, 1]"),
        (["--model", "vgg-mlp", "--fraction", "1.0", "0.5"], "give fractions in increasing order"),
        (["--model", "vgg-mlp", "--dataset", "/nonexistent/dir"], "not 'digits' and not a directory"),
        (["--model", "vgg-mlp", "--dataset", "{tmp}"], "not an ImageFolder"),
        (["--model", "vgg-mlp", "--epochs", "0"], "--epochs 0: must be at least 1"),
        (["--model", "vgg-mlp", "--checkpoint", "{tmp}/none.pt"], "none.pt: no such file"),
        (["--model", "vgg-mlp", "--model-arg", "width"], "--model-arg 'width': expected KEY=VALUE"),
        (["--model", "vgg-mlp", "--model-arg", "nope=1"], "--model vgg-mlp:"),
    ],
)
def test_finetune_cli_user_errors(tmp_path, capsys, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [arg.replace("{tmp}", str(empty)) for arg in extra]
    out = tmp_path / "o"
    assert main(["finetune", "--epochs", "1", *extra, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lc-onnx finetune: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # no partial output


@pytest.mark.parametrize(
    ("change", "message", "params"),
    [
        ({"fractions": (1.5,)}, "fractions 1.5: must be in [0, 1]", ("fractions",)),
        ({"fractions": (1.0, 0.5)}, "fractions 1.0 0.5: give fractions in increasing order", ("fractions",)),
        ({"epochs": 0}, "epochs 0: must be at least 1", ("epochs",)),
    ],
)
def test_finetune_errors_name_parameters_not_flags(tmp_path, change, message, params):
    """A Python caller reads the `FinetuneConfig` field names; the CLI test above reads the flags."""
    out = tmp_path / "o"
    with pytest.raises(UserError) as exc:
        finetune(FinetuneConfig(model="vgg-mlp", out=out, progress=False, **change))
    assert str(exc.value) == message
    assert exc.value.params == params
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--epochs", "x"], ["--lam"], ["--bogus"], []])
def test_finetune_cli_bad_flags_exit_2(tmp_path, capsys, flag):
    args = ["finetune", *flag] + (["--model", "vgg-mlp", "--out", str(tmp_path)] if flag else [])
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lc-onnx finetune: error: "), err


def test_finetune_under_torchrun_env_world_size_1(tmp_path, monkeypatch):
    """The DDP path (gloo, world size 1) runs and writes the same files."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    from lc_onnx.torch.finetune import loop

    seen = []
    real_wrap = loop.wrap

    def spy(raw, ctx):
        wrapped = real_wrap(raw, ctx)
        seen.append((ctx.world, type(wrapped).__name__))
        return wrapped

    monkeypatch.setattr(loop, "wrap", spy)
    out = tmp_path / "ddp"
    args = ["finetune", "--model", "vgg-mlp", "--model-arg", "width=4", "--model-arg", "hidden=16"]
    assert main([*args, "--epochs", "1", "--img-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert seen and seen[0] == (1, "DistributedDataParallel")
    assert (out / "report.json").exists()
    assert not torch.distributed.is_initialized()


def test_adaptive_depth_with_labels_measures_test_accuracy(tmp_path):
    # `--max-drop 1` allows any loss: both blocks of vgg-mlp are collapsed, one stage each, output side
    # first; the report keeps the labels recipe's accuracy block and gains the search record.
    out = tmp_path / "run"
    args = ["finetune", "--model", "vgg-mlp", "--dataset", "digits", "--fraction", "1", "--epochs", "1"]
    args += ["--out", str(out), "--no-progress", "--img-size", "8", "--max-drop", "1"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    adaptive = report["adaptive"]
    assert adaptive["blocks_reached"] == 2 and "all 2 targeted block(s)" in adaptive["stopped"]
    assert [s["block"] for s in adaptive["stages"]] == ["classifier.5", "classifier.1"]
    start = report["accuracy"]["start"] / 100
    for stage in adaptive["stages"]:
        assert stage["drop"] == pytest.approx(start - stage["test_accuracy"])
    assert report["blocks"]["collapsed"] == 2 and report["blocks"]["collapsed_during_training"] == [
        "classifier.5",
        "classifier.1",
    ]
    # the last stage's collapsed model is what was exported: its accuracy is the last stage's
    assert report["accuracy"]["before_collapse"] / 100 == pytest.approx(
        adaptive["stages"][-1]["test_accuracy"]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, 1), (2, 1)]


@pytest.mark.slow
def test_finetune_under_torchrun_two_processes(tmp_path):
    """`torchrun --nproc-per-node 2` on CPU (gloo): both ranks train, rank 0 writes the outputs, and the
    progressive schedule moves to the second stage. About 25 s on 2 cores; run with `-m slow`."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    args = [torchrun, "--nproc-per-node", "2", "--master-port", "29617", "-m", "lc_onnx.cli", "finetune"]
    args += ["--model", "vgg-mlp", "--model-arg", "width=4", "--model-arg", "hidden=16", "--img-size", "8"]
    args += ["--epochs", "2", "--fraction", "0.5", "1.0", "--init", "1.0", "--slope-lr", "0"]
    args += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("2/2 MLP blocks collapsed") == 1  # only rank 0 reports
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0]["collapsed"] == ["classifier.5"] and rows[0]["stage"] == 1
    report = json.loads((out / "report.json").read_text())
    assert report["blocks"]["collapsed_at_end"] == ["classifier.1"]
    assert report["blocks"]["collapsed"] == 2
