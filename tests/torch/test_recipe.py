from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from lc_onnx.cli import main  # noqa: E402
from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch import collapse, collapsible, make_collapsible  # noqa: E402
from lc_onnx.torch.data import digits  # noqa: E402
from lc_onnx.torch.train import Schedule, Structure, load_checkpoint, save_checkpoint  # noqa: E402
from tests.torch import models  # noqa: E402


def test_digits_split_is_fixed_and_upsampled():
    splits = digits(16)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (1437, 360, 10)
    x, y = splits.test[0]
    assert x.shape == (3, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(digits(16).test.tensors[1], splits.test.tensors[1])


@pytest.mark.parametrize("build", [models.vit, models.vgg])
def test_checkpoint_round_trip_of_partly_collapsed_model(tmp_path, build):
    torch.manual_seed(0)
    model = models.randomise(build())
    make_collapsible(model, per_channel=build is models.vgg)
    last = collapsible.find_blocks(model)[-1]
    with torch.no_grad():
        last.act.weight.fill_(1.0)
    steps = collapsible.collapse_steps(model, 0.05)
    assert len(steps) == 1
    x = models.images(4)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, Structure.of(model, [fc1 for fc1, _ in steps]), epoch=3)

    fresh = build().eval()
    payload = load_checkpoint(path, fresh)
    assert payload["epoch"] == 3
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    """A checkpoint holding an arbitrary object is refused instead of unpickled."""
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "structure": {}, "obj": Structure()}, path)
    with pytest.raises(UserError, match="not a readable lc-onnx checkpoint"):
        load_checkpoint(path, models.vit())
    # and the reason is the weights-only unpickler, not the content
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_checkpoint_for_another_model_is_a_user_error(tmp_path):
    model = models.vit(depth=4)
    make_collapsible(model, 0.5)
    save_checkpoint(tmp_path / "c.pt", model, Structure.of(model, []))
    with pytest.raises(UserError, match="does not fit this model"):
        load_checkpoint(tmp_path / "c.pt", models.vit(depth=2))


def test_chain_collapse_replays_in_order(tmp_path):
    model = models.randomise(models.vgg())
    make_collapsible(model, init=1.0)
    steps = collapsible.collapse_steps(model, 0.05)
    assert steps == [("classifier.4", "classifier.7"), ("classifier.0", "classifier.4")]
    assert collapsible.surviving_linears(steps) == ["classifier.0"]
    save_checkpoint(tmp_path / "c.pt", model, Structure.of(model, [s[0] for s in steps]))
    fresh = models.vgg().eval()
    load_checkpoint(tmp_path / "c.pt", fresh)
    assert fresh.classifier[0].weight.shape == (10, 8)


def test_schedule_extends_only_when_stage_collapsed():
    schedule = Schedule([f"b{i}" for i in range(6)], [0.5, 1.0])
    assert schedule.targets() == ["b3", "b4", "b5"]
    assert schedule.advance({"b4", "b5"}) == []
    assert schedule.advance({"b3", "b4", "b5"}) == ["b0", "b1", "b2"]
    assert schedule.stage == 1
    assert schedule.advance({f"b{i}" for i in range(6)}) == []


def test_penalty_training_drives_slopes_to_collapse():
    """A few hundred steps of penalty alone (λ large) bring the slope within the threshold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    make_collapsible(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        (model(torch.randn(16, 4)).pow(2).mean() * 0 + 10 * collapsible.collapse_penalty(model)).backward()
        opt.step()
    assert abs(model[1].weight.item() - 1) <= 0.05
    assert collapse(model) == ["0"]


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
    from lc_onnx.torch import train

    seen = []
    real_wrap = train._wrap

    def spy(raw, ctx):
        wrapped = real_wrap(raw, ctx)
        seen.append((ctx.world, type(wrapped).__name__))
        return wrapped

    monkeypatch.setattr(train, "_wrap", spy)
    out = tmp_path / "ddp"
    args = ["finetune", "--model", "vgg-mlp", "--model-arg", "width=4", "--model-arg", "hidden=16"]
    assert main([*args, "--epochs", "1", "--img-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert seen and seen[0] == (1, "DistributedDataParallel")
    assert (out / "report.json").exists()
    assert not torch.distributed.is_initialized()


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
