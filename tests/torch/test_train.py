from __future__ import annotations

import json
import pickle

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
    args += ["--init", "1.0", "--out", str(out), "--no-progress", "--img-size", "8"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # init 1.0: both blocks are linear at once and collapse after the first epoch
    assert report["blocks"]["total"] == 2
    assert report["blocks"]["collapsed"] == 2
    assert report["blocks"]["collapsed_during_training"] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    acc = report["accuracy"]
    assert acc["after_collapse_torch"] == pytest.approx(
        acc["after_collapse_onnxruntime"], abs=100 / 360 + 1e-9
    )
    # 2 blocks of 16 -> 32 -> 16 become 16 -> 16: 2 * ((16*32+32) + (32*16+16) + 1 - (16*16+16)) removed
    assert report["params"]["start"] - report["params"]["after_collapse_torch"] == 2 * (544 + 528 + 1 - 272)
    assert report["macs"]["onnx_before_fuse"] > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
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
        (["--model", "vgg-mlp", "--model-arg", "width"], "--model-arg 'width': expected KEY=VALUE"),
        (["--model", "vgg-mlp", "--model-arg", "nope=1"], "--model vgg-mlp:"),
    ],
)
def test_finetune_cli_user_errors(tmp_path, capsys, extra, message):
    assert main(["finetune", *extra, "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lc-onnx finetune: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


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
