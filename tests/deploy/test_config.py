"""config.pbtxt derived from the graph, parsed with Triton's own ModelConfig schema."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper

from lc_onnx.deploy.config import TRITON_DTYPES, build_config
from lc_onnx.errors import UserError
from tests.deploy import helpers

pytest.importorskip("tritonclient")


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(helpers.HEADER + text)


@pytest.mark.parametrize("case", sorted(helpers.GRAPHS))
def test_config_declares_every_input_and_output(case):
    text, expected_batch = helpers.GRAPHS[case]
    model = parse(text)
    config = helpers.parse_config_text(build_config(model, "m").to_pbtxt())
    assert config.name == "m"
    assert config.max_batch_size == expected_batch
    helpers.assert_config_matches_graph(config, model)


@pytest.mark.parametrize("batch", [0, 4])
def test_explicit_max_batch_size_sets_dims(batch):
    model = parse(helpers.GRAPHS["symbolic_inner"][0])
    config = helpers.parse_config_text(build_config(model, "m", max_batch_size=batch).to_pbtxt())
    assert config.max_batch_size == batch
    assert list(config.input[0].dims) == ([-1, 8] if batch else [-1, -1, 8])
    helpers.assert_config_matches_graph(config, model)


def test_fp16_and_int64_map_to_their_triton_types():
    config = helpers.parse_config_text(build_config(parse(helpers.GRAPHS["fp16_int64"][0]), "m").to_pbtxt())
    schema = helpers.model_config_pb2()
    types = {t.name: schema.DataType.Name(t.data_type) for t in (*config.input, *config.output)}
    assert types == {"a": "TYPE_FP16", "y": "TYPE_FP16", "b": "TYPE_INT64", "z": "TYPE_INT64"}


def test_type_table_covers_every_triton_type_and_agrees_with_tritonclient():
    schema = helpers.model_config_pb2()
    assert set(TRITON_DTYPES.values()) == set(schema.DataType.keys()) - {"TYPE_INVALID"}
    for elem, name in TRITON_DTYPES.items():
        assert name == helpers.triton_type(elem), TensorProto.DataType.Name(elem)


UNSUPPORTED = [
    t for t in TensorProto.DataType.values() if t not in TRITON_DTYPES and t != TensorProto.UNDEFINED
]


@pytest.mark.parametrize("elem", UNSUPPORTED, ids=[TensorProto.DataType.Name(t) for t in UNSUPPORTED])
def test_types_triton_cannot_serve_are_refused_by_name(elem):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["odd_in"], ["y"])],
        "g",
        [helper.make_tensor_value_info("odd_in", elem, ["N", 2])],
        [helper.make_tensor_value_info("y", elem, ["N", 2])],
    )
    with pytest.raises(UserError, match=rf"input 'odd_in' .*{TensorProto.DataType.Name(elem)}"):
        build_config(helper.make_model(graph), "m")


def test_output_without_shape_gets_it_from_shape_inference():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    config = helpers.parse_config_text(build_config(helper.make_model(graph), "m").to_pbtxt())
    assert config.max_batch_size == 8
    assert list(config.output[0].dims) == [5]


def test_initializers_listed_as_inputs_are_not_served():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])],
    )
    config = helpers.parse_config_text(build_config(helper.make_model(graph), "m").to_pbtxt())
    assert [t.name for t in config.input] == ["x"]


def test_names_that_need_escaping_round_trip_through_text_format():
    model = parse(helpers.GRAPHS["static"][0])
    odd = 'in "quoted" \\ tab\there é'
    model.graph.node[0].input[0] = odd
    model.graph.input[0].name = odd
    config = helpers.parse_config_text(build_config(model, "m").to_pbtxt())
    assert config.input[0].name == odd


@pytest.mark.parametrize("accelerator", ["cuda", "tensorrt"])
def test_gpu_instances_and_accelerator(accelerator):
    model = parse(helpers.GRAPHS["fp16_int64"][0])
    text = build_config(
        model, "m", instance_kind="gpu", instances=2, dynamic_batching=True, accelerator=accelerator
    ).to_pbtxt()
    config = helpers.parse_config_text(text)
    schema = helpers.model_config_pb2()
    [group] = config.instance_group
    assert (group.kind, group.count) == (schema.ModelInstanceGroup.KIND_GPU, 2)
    assert config.HasField("dynamic_batching")
    [acc] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == accelerator
    assert not config.optimization.execution_accelerators.cpu_execution_accelerator


def test_defaults_are_one_cpu_instance_no_batching_no_accelerator():
    config = helpers.parse_config_text(build_config(parse(helpers.GRAPHS["static"][0]), "m").to_pbtxt())
    schema = helpers.model_config_pb2()
    [group] = config.instance_group
    assert (group.kind, group.count) == (schema.ModelInstanceGroup.KIND_CPU, 1)
    assert not config.HasField("dynamic_batching")
    assert not config.HasField("optimization")


@pytest.mark.parametrize(
    ("case", "kwargs", "message", "params"),
    [
        (
            "static", {"max_batch_size": 8},
            "max_batch_size 8 needs a leading dynamic batch dimension on every input and output, but 'x' has "
            "shape [1, 4]; use max_batch_size 0 to serve full shapes",
            ("max_batch_size",),
        ),
        (
            "one_static_output", {"max_batch_size": 2},
            "max_batch_size 2 needs a leading dynamic batch dimension on every input and output, but 'm' has "
            "shape [4]; use max_batch_size 0 to serve full shapes",
            ("max_batch_size",),
        ),
        ("static", {"max_batch_size": -1}, "max_batch_size must be 0 or more, got -1", ("max_batch_size",)),
        (
            "static", {"dynamic_batching": True},
            "dynamic_batching needs max_batch_size above 0 (Triton batches along dim 0)",
            ("dynamic_batching", "max_batch_size"),
        ),
        (
            "fp16_int64", {"accelerator": "tensorrt"},
            "accelerator tensorrt runs on GPU instances; use instance_kind gpu",
            ("accelerator", "instance_kind"),
        ),
        (
            "fp16_int64", {"accelerator": "openvino"},
            "accelerator must be one of none, cuda, tensorrt, got 'openvino'",
            ("accelerator",),
        ),
        (
            "fp16_int64", {"instance_kind": "tpu"},
            "instance_kind must be one of cpu, gpu, got 'tpu'",
            ("instance_kind",),
        ),
        ("fp16_int64", {"instances": 0}, "instances must be 1 or more, got 0", ("instances",)),
    ],
)  # fmt: skip
def test_refusals_name_the_problem_and_the_parameter(case, kwargs, message, params):
    with pytest.raises(UserError) as caught:
        build_config(parse(helpers.GRAPHS[case][0]), "m", **kwargs)
    assert str(caught.value) == message
    assert caught.value.params == params


def test_sequence_outputs_are_refused():
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["s"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
    )
    with pytest.raises(UserError, match=r"output 's' is a sequence_type, not a tensor"):
        build_config(helper.make_model(graph), "m")
