"""lc_onnx.deploy.model_config against Triton's own `model_config.proto` (tritonclient's generated module):
the same field names, numbers, types and enum values, the same bytes for the same text, and no flag names
anywhere in the deploy library."""

from __future__ import annotations

import ast
from pathlib import Path

import onnx.parser
import pytest
from google.protobuf import text_format

from lc_onnx.deploy import model_config
from lc_onnx.deploy.config import build_config
from tests.deploy import helpers

pytest.importorskip("tritonclient")

DEPLOY = Path(__file__).resolve().parents[2] / "lc_onnx" / "deploy"


def field_shape(field) -> tuple:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    return (field.number, field.type, repeated)


def assert_same_schema(ours, theirs, seen: set[str]) -> None:
    """Every field of `ours` exists in `theirs` with the same number, type and label; recursively."""
    assert ours.full_name == theirs.full_name
    if ours.full_name in seen:
        return
    seen.add(ours.full_name)
    for field in ours.fields:
        assert field.name in theirs.fields_by_name, f"{ours.full_name}.{field.name}"
        real = theirs.fields_by_name[field.name]
        assert field_shape(field) == field_shape(real), f"{ours.full_name}.{field.name}"
        if field.enum_type is not None:
            assert field.enum_type.full_name == real.enum_type.full_name
            assert {v.name: v.number for v in field.enum_type.values} == {
                v.name: v.number for v in real.enum_type.values
            }, field.enum_type.full_name
        if field.message_type is not None:
            assert_same_schema(field.message_type, real.message_type, seen)


def test_every_declared_field_is_tritons():
    seen: set[str] = set()
    assert_same_schema(
        model_config.ModelConfig.DESCRIPTOR, helpers.model_config_pb2().ModelConfig.DESCRIPTOR, seen
    )
    # ModelConfig, ModelInput, ModelOutput, reshape, instance group, batching, optimization (three levels)
    assert len(seen) == 9


@pytest.mark.parametrize("case", sorted(helpers.GRAPHS))
@pytest.mark.parametrize(
    "options",
    [{}, {"instance_kind": "gpu", "instances": 3, "dynamic_batching": True, "accelerator": "tensorrt"}],
    ids=["defaults", "everything"],
)
def test_the_text_means_to_triton_what_it_means_to_us(case, options):
    text, batch = helpers.GRAPHS[case]
    if options.get("dynamic_batching") and batch == 0:
        options = {**options, "dynamic_batching": False}
    config = build_config(onnx.parser.parse_model(helpers.HEADER + text), "m", **options)
    theirs = helpers.parse_config_text(config.to_pbtxt())
    ours = config.to_proto()
    assert theirs.SerializeToString(deterministic=True) == ours.SerializeToString(deterministic=True)
    assert model_config.parse(text_format.MessageToString(theirs)) == ours


def test_the_text_is_deterministic_and_round_trips():
    config = build_config(
        onnx.parser.parse_model(helpers.HEADER + helpers.GRAPHS["batch_only_output"][0]), "m"
    )
    text = config.to_pbtxt()
    assert text == config.to_pbtxt() == model_config.to_text(model_config.parse(text))
    assert '  name: "s"\n  data_type: TYPE_FP32\n  dims: [1]\n  reshape {\n  }\n' in text


def test_spelling_does_not_matter_to_the_comparison():
    written = model_config.parse('name: "m" input { name: "x" dims: [-1, 8] } max_batch_size: 4')
    other = model_config.parse(
        '# a comment\nmax_batch_size: 4\nname: "m"\ninput [ { dims: -1 dims: 8, name: "x" } ]\n'
    )
    assert model_config.difference(other, written) is None
    # proto3, like Triton: an explicit zero is the same as no value.
    assert model_config.parse("max_batch_size: 0") == model_config.parse("")


OLD = 'name: "m" max_batch_size: 4 input { name: "x" dims: [-1, 8] }'


@pytest.mark.parametrize(
    ("new", "difference"),
    [
        (OLD.replace("4", "8"), "max_batch_size: 4, would be 8"),
        (OLD.replace("8]", "6]"), "input[0].dims: [-1, 8], would be [-1, 6]"),
        (
            OLD.replace('"x"', '"x" data_type: TYPE_FP16'),
            "input[0].data_type: TYPE_INVALID, would be TYPE_FP16",
        ),
        (OLD + ' input { name: "z" }', "input: 1 of them, would be 2"),
        (OLD + " dynamic_batching { }", "dynamic_batching: not set, would be set"),
        (OLD + " instance_group { kind: KIND_GPU }", "instance_group: 0 of them, would be 1"),
        (OLD, None),
    ],
)
def test_difference_names_the_first_field_that_differs(new, difference):
    assert model_config.difference(model_config.parse(OLD), model_config.parse(new)) == difference


def test_fields_triton_has_but_we_do_not_write_are_refused_by_parse():
    with pytest.raises(text_format.ParseError, match=r'no field named "parameters"'):
        model_config.parse('name: "m" parameters { key: "k" value { string_value: "v" } }')


def test_the_deploy_library_names_no_command_line_flags():
    for path in sorted(DEPLOY.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert "argparse" not in names, path.name
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert " --" not in f" {node.value}", f"{path.name}: {node.value!r}"
