"""A real Triton server (the `tritonserver` binary that the nvidia-pytriton wheel bundles) serving the
repository `lc-onnx` writes, queried over HTTP with tritonclient on 127.0.0.1.

What is real and what is substituted: the server, its parsing and validation of our `config.pbtxt`
(names, TYPE_*, dims, max_batch_size, instance_group, dynamic_batching), the HTTP protocol and the client
are Triton's own, with auto-completion of the config switched off so it is used as written. The
nvidia-pytriton wheel ships only Triton's *Python* backend, not the onnxruntime backend, so in a copy of
the repository the one line `platform: "onnxruntime_onnx"` becomes `backend: "python"` and each version
directory gets a `model.py` that runs that version's `model.onnx` in onnxruntime. Everything else in the
config and the version directories is served exactly as written.

Skipped when the `pytriton` package (the server binary) is not installed. Install it without its
dependencies, which pin numpy<2: `pip install --no-deps nvidia-pytriton==0.7.0`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

import lc_onnx
from lc_onnx.deploy import TritonOptions, write_model_repository
from lc_onnx.model.demo import build_demo_model
from tests.deploy import helpers

http = pytest.importorskip("tritonclient.http")
pytest.importorskip("onnxruntime")

STARTUP_TIMEOUT_S = 90

# Runs in Triton's Python backend stub. DLPack instead of `as_numpy()` / `Tensor(name, ndarray)`: the
# stub bundled with pytriton 0.7 is built with a pybind11 that predates numpy 2's ABI and misreads the
# strides of numpy 2 arrays (every element comes back as the first one), while DLPack bypasses it.
ONNXRUNTIME_IN_PYTHON_BACKEND = """
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {
                name: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name)).copy()
                for name in self.inputs
            }
            results = self.session.run(self.outputs, feeds)
            tensors = [
                pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(value))
                for name, value in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
"""

TYPES_MODEL = (
    helpers.HEADER
    + "types (float16[N,4] a, int64[N,2] b) => (float16[N,4] y, int64[N,2] z) { y = Relu(a) z = Neg(b) }"
)
PLATFORM_LINE = 'platform: "onnxruntime_onnx"'
REDUCE_MODEL = (
    helpers.HEADER + "reduce (float[N,4] x) => (float[N] s) "
    "{ ax = Constant <value = int64[1] {1}> () s = ReduceSum <keepdims=0> (x, ax) }"
)
STATIC_MODEL = helpers.HEADER + "fixed (float[2,3] x) => (float[2,3] y) { y = Sigmoid(x) }"


@dataclass
class Served:
    url: str
    client: object
    repo: Path
    fused_model: onnx.ModelProto
    models: dict[str, onnx.ModelProto]


def _server_dist() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locates the files without importing pytriton
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(spec.submodule_search_locations[0]) / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").is_file() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_python_backend(repo: Path, serve_repo: Path) -> None:
    """Copy `repo`, swapping only the platform line for the Python backend and adding model.py."""
    shutil.copytree(repo, serve_repo)
    for config_path in serve_repo.glob("*/config.pbtxt"):
        text = config_path.read_text()
        assert text.count(PLATFORM_LINE) == 1
        config_path.write_text(text.replace(PLATFORM_LINE, 'backend: "python"'))
        for version_dir in config_path.parent.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                (version_dir / "model.py").write_text(ONNXRUNTIME_IN_PYTHON_BACKEND)


def _backends_dir(dist: Path, work: Path) -> Path:
    # pytriton's own recipe: the python backend plus the stub built for this interpreter's version.
    backends = work / "backends"
    shutil.copytree(dist / "backends", backends)
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(stub / "triton_python_backend_stub", backends / "python" / "triton_python_backend_stub")
    return backends


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    dist = _server_dist()
    if dist is None:
        pytest.skip("no tritonserver binary: `pip install --no-deps nvidia-pytriton==0.7.0` provides one")
    work = tmp_path_factory.mktemp("triton")
    repo = work / "repo"
    fused = lc_onnx.fuse(build_demo_model())
    assert fused.collapsed > 0
    write_model_repository(
        fused.model, repo, TritonOptions(name="demo", dynamic_batching=True, instances=2),
        report=fused.report.to_dict(),
    )  # fmt: skip
    types_model = onnx.parser.parse_model(TYPES_MODEL)
    static_model = onnx.parser.parse_model(STATIC_MODEL)
    reduce_model = onnx.parser.parse_model(REDUCE_MODEL)
    for model in (types_model, static_model, reduce_model):
        write_model_repository(model, repo)
    _as_python_backend(repo, work / "serve")

    port = _free_port()
    env = dict(os.environ)
    # The stub embeds libpython: use this interpreter's, and find this environment's python3 (and with it
    # onnxruntime) first on PATH, which is how the embedded interpreter locates its site-packages.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [str(dist.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    log_path = work / "server.log"
    command = [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={work / 'serve'}",
        f"--backend-directory={_backends_dir(dist, work)}",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--disable-auto-complete-config",
        "--exit-on-error=true",
    ]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"127.0.0.1:{port}"
    client = http.InferenceServerClient(url)
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"tritonserver exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # connection refused until the HTTP endpoint is up
                pass
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(
                    f"tritonserver not ready after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        yield Served(
            url,
            client,
            repo,
            fused.model,
            {"types": types_model, "fixed": static_model, "reduce": reduce_model},
        )
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _infer(client, model_name: str, feeds: dict[str, np.ndarray], outputs: list[str]):
    inputs = []
    for name, value in feeds.items():
        tensor = http.InferInput(name, list(value.shape), _wire_type(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer(model_name, inputs, outputs=[http.InferRequestedOutput(n) for n in outputs])
    return [result.as_numpy(n) for n in outputs]


def _wire_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def test_server_loads_every_model_with_the_config_as_written(served):
    client, repo = served.client, served.repo
    for name in ("demo", "types", "fixed", "reduce"):
        assert client.is_model_ready(name), name
        written = helpers.parse_config(repo / name / "config.pbtxt")
        live = client.get_model_config(name)
        assert live["max_batch_size"] == written.max_batch_size
        for key, declared in (("input", written.input), ("output", written.output)):
            assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in live[key]] == [
                (t.name, helpers.model_config_pb2().DataType.Name(t.data_type), list(t.dims))
                for t in declared
            ]
    demo = client.get_model_config("demo")
    assert "dynamic_batching" in demo
    assert [(g["kind"], g["count"]) for g in demo["instance_group"]] == [("KIND_CPU", 2)]


def test_collapsed_model_answers_like_the_fused_model(served):
    client, fused_model = served.client, served.fused_model
    rng = np.random.default_rng(0)
    for batch in (1, 3, 8):
        tokens = rng.standard_normal((batch, 16, 32)).astype(np.float32)
        [logits] = _infer(client, "demo", {"tokens": tokens}, ["logits"])
        [expected] = helpers.run_ort(fused_model, {"tokens": tokens})
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_concurrent_requests_through_the_dynamic_batcher(served):
    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal((1, 16, 32)).astype(np.float32) for _ in range(12)]
    pool = http.InferenceServerClient(served.url, concurrency=6)
    try:
        pending = []
        for tokens in feeds:
            tensor = http.InferInput("tokens", list(tokens.shape), "FP32")
            tensor.set_data_from_numpy(tokens)
            pending.append(pool.async_infer("demo", [tensor]))
        for tokens, request in zip(feeds, pending):
            [expected] = helpers.run_ort(served.fused_model, {"tokens": tokens})
            np.testing.assert_allclose(
                request.get_result().as_numpy("logits"), expected, rtol=1e-5, atol=1e-6
            )
    finally:
        pool.close()


def test_fp16_and_int64_travel_as_declared(served):
    client = served.client
    rng = np.random.default_rng(2)
    feeds = {
        "a": rng.standard_normal((5, 4)).astype(np.float16),
        "b": rng.integers(-(2**40), 2**40, size=(5, 2), dtype=np.int64),
    }
    y, z = _infer(client, "types", feeds, ["y", "z"])
    assert (y.dtype, z.dtype) == (np.float16, np.int64)
    np.testing.assert_array_equal(y, np.maximum(feeds["a"], 0))
    np.testing.assert_array_equal(z, -feeds["b"])


def test_full_dims_model_without_batching(served):
    client, models = served.client, served.models
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    [y] = _infer(client, "fixed", {"x": x}, ["y"])
    [expected] = helpers.run_ort(models["fixed"], {"x": x})
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    wrong = http.InferInput("x", [1, 2, 3], "FP32")
    wrong.set_data_from_numpy(x[None])
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("fixed", [wrong])


def test_batch_only_output_is_reshaped_per_item(served):
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    [s] = _infer(served.client, "reduce", {"x": x}, ["s"])
    # The config declares dims [1] with reshape [ ]: the graph's [N] reaches the client as [N, 1].
    assert s.shape == (3, 1)
    np.testing.assert_allclose(s[:, 0], x.sum(axis=1), rtol=1e-5)
