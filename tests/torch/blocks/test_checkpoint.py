from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch import make_collapsible  # noqa: E402
from lc_onnx.torch.blocks import collapsible  # noqa: E402
from lc_onnx.torch.blocks.checkpoint import Structure, load_checkpoint, save_checkpoint  # noqa: E402
from tests.torch import nets  # noqa: E402


@pytest.mark.parametrize("build", [nets.vit, nets.vgg])
def test_checkpoint_round_trip_of_partly_collapsed_model(tmp_path, build):
    torch.manual_seed(0)
    model = nets.randomise(build())
    make_collapsible(model, per_channel=build is nets.vgg)
    last = collapsible.find_blocks(model)[-1]
    with torch.no_grad():
        last.act.weight.fill_(1.0)
    steps = collapsible.collapse_steps(model, 0.05)
    assert len(steps) == 1
    x = nets.images(4)
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
        load_checkpoint(path, nets.vit())
    # and the reason is the weights-only unpickler, not the content
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_checkpoint_for_another_model_is_a_user_error(tmp_path):
    model = nets.vit(depth=4)
    make_collapsible(model, 0.5)
    save_checkpoint(tmp_path / "c.pt", model, Structure.of(model, []))
    with pytest.raises(UserError, match="does not fit this model"):
        load_checkpoint(tmp_path / "c.pt", nets.vit(depth=2))


def test_chain_collapse_replays_in_order(tmp_path):
    model = nets.randomise(nets.vgg())
    make_collapsible(model, init=1.0)
    steps = collapsible.collapse_steps(model, 0.05)
    assert steps == [("classifier.4", "classifier.7"), ("classifier.0", "classifier.4")]
    assert collapsible.surviving_linears(steps) == ["classifier.0"]
    save_checkpoint(tmp_path / "c.pt", model, Structure.of(model, [s[0] for s in steps]))
    fresh = nets.vgg().eval()
    load_checkpoint(tmp_path / "c.pt", fresh)
    assert fresh.classifier[0].weight.shape == (10, 8)


def test_checkpoint_of_a_data_flow_model_restores_without_example_inputs(tmp_path):
    """GPT-2 (Conv1D MLPs, found only by data flow): one block collapsed, one still a PReLU; a fresh
    model takes the checkpoint with no forward pass, from the block names stored in it."""
    pytest.importorskip("transformers")
    from tests.exports import randomise
    from tests.torch.families import gpt2, text

    torch.manual_seed(0)
    model = gpt2(layers=2)
    inputs = text()(0)
    make_collapsible(model, example_inputs=inputs)
    randomise(model)
    with torch.no_grad():
        model.h[1].mlp.act.weight.fill_(1.0)
    steps = collapsible.collapse_steps(model, 0.05)
    assert steps == [("h.1.mlp.c_fc", "h.1.mlp.c_proj")]
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    structure = Structure.of(model, [fc1 for fc1, _ in steps])
    assert structure.blocks == [
        {"slots": [f"h.{i}.mlp.c_fc", f"h.{i}.mlp.act", f"h.{i}.mlp.c_proj"], "act": f"h.{i}.mlp.act"}
        for i in range(2)
    ]
    save_checkpoint(tmp_path / "c.pt", model, structure)

    fresh = gpt2(layers=2).eval()
    load_checkpoint(tmp_path / "c.pt", fresh)
    assert [b.name for b in collapsible.prelu_blocks(fresh)] == ["h.0.mlp.act"]
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, expected)
