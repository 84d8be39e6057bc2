"""The CUDA, onnxruntime-gpu and TensorRT code paths, checked where this machine can run them.

TensorRT is absent here, so its builder and execution context are stand-ins that record every call:
the tests assert the exact TensorRT 10/11 API calls the real code makes (names and arguments as in
the TensorRT Python bindings) and what it does with their results. ONNX Runtime's CUDA provider is
exercised for real: onnxruntime-gpu is installed but no GPU is, so its CUDA libraries do not load,
which is the case the automatic CPU fallback exists for. Tests needing a GPU skip with the reason.
"""
import enum
import os
import sys
import tomllib
import types
from unittest.mock import ANY

import onnx
import onnxruntime
import pytest
import torch

import cnnbench.export.pipeline as pipeline
import cnnbench.export.tensorrt as trt_module
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.transforms import normalize
from cnnbench.export import ExportError, export_checkpoints, export_onnx
from cnnbench.export.int8 import quantize_int8
from cnnbench.export.ort import cuda_provider_problem, make_ort_session
from cnnbench.export.tensorrt import TensorRTEngine, TensorRTError, aligned, build_tensorrt_engine, torch_dtype
from cnnbench.export.trt_support import TensorRTSupportError, tensorrt_findings
from cnnbench.models import create_model
from runtime_testlib import DENSE_SPEC, tiny_run

SPEC = spec_for_crop(32)
try:
    import tensorrt  # noqa: F401
    REAL_TENSORRT = True
except ImportError:
    REAL_TENSORRT = False
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-paths")
    torch.manual_seed(0)
    model = create_model("resnet18", 4, width_mult=0.125).eval()
    path = folder / "model.onnx"
    info = export_onnx(model, path, spec=SPEC)
    return path, info["io"]


# --- TensorRT builder: TF32 cleared --------------------------------------------------------------

class _FakeTensorRT(types.ModuleType):
    """The part of the ``tensorrt`` module build_tensorrt_engine uses; every call lands in ``calls``."""

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.99-fake"
        self.calls = []
        calls = self.calls

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                calls.append(("Logger", level))

        def record(name, result=None):
            def method(*args, **kwargs):
                calls.append((name, *args, *sorted(kwargs.items())))
                return result
            return method

        cache = types.SimpleNamespace(serialize=record("serialize", b"cache"))
        config = types.SimpleNamespace(
            set_memory_pool_limit=record("set_memory_pool_limit"), clear_flag=record("clear_flag"),
            add_optimization_profile=record("add_optimization_profile", 0),
            create_timing_cache=record("create_timing_cache", cache), set_timing_cache=record("set_timing_cache", True),
            get_timing_cache=record("get_timing_cache", cache))
        profile = types.SimpleNamespace(set_shape=record("set_shape"))
        builder = types.SimpleNamespace(create_network=record("create_network", "network"),
                                        create_builder_config=record("create_builder_config", config),
                                        create_optimization_profile=record("create_optimization_profile", profile),
                                        build_serialized_network=record("build_serialized_network", b"plan"))
        self.Logger = Logger
        self.Builder = record("Builder", builder)
        self.OnnxParser = record("OnnxParser", types.SimpleNamespace(parse_from_file=record("parse_from_file", True),
                                                                    num_errors=0))
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32")


@pytest.mark.skipif(REAL_TENSORRT, reason="the real TensorRT is installed: test_export_tensorrt builds real engines")
def test_engines_are_built_without_tf32(tmp_path, monkeypatch):
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_module, "tensorrt_status", lambda: (True, ""))
    built = build_tensorrt_engine("m.onnx", tmp_path / "m.plan", input_name="input", min_shape=(1, 3, 8, 8),
                                  opt_shape=(4, 3, 8, 8), max_shape=(4, 3, 8, 8),
                                  timing_cache_path=tmp_path / "t.cache")
    assert fake.calls == [
        ("Logger", "WARNING"), ("Builder", ANY), ("create_network", 1 << 5), ("OnnxParser", "network", ANY),
        ("parse_from_file", "m.onnx"), ("create_builder_config",), ("set_memory_pool_limit", "WORKSPACE", 4 << 30),
        ("clear_flag", "TF32"),  # TensorRT enables TF32 unless it is cleared
        ("create_optimization_profile",), ("set_shape", "input", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)),
        ("add_optimization_profile", ANY), ("create_timing_cache", b""), ("set_timing_cache", ANY, ("ignore_mismatch", False)),
        ("build_serialized_network", "network", ANY), ("get_timing_cache",), ("serialize",)]
    assert built["file"] == "m.plan" and (tmp_path / "m.plan").read_bytes() == b"plan"


# --- Running an engine: shapes, addresses, alignment, types, streams -----------------------------

class _DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class _Mode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


FAKE_TRT = types.SimpleNamespace(DataType=_DataType, TensorIOMode=_Mode)


class _FakeEngine:
    """ICudaEngine's name-based I/O queries for an engine with ``images`` (uint8) in and ``logits`` out."""

    def __init__(self, side: int, max_batch: int, logits_type=_DataType.FLOAT):
        self.num_io_tensors = 2
        self._io = {"images": (_Mode.INPUT, _DataType.UINT8), "logits": (_Mode.OUTPUT, logits_type)}
        self._profile = [(1, 3, side, side), (max_batch, 3, side, side), (max_batch, 3, side, side)]

    def get_tensor_name(self, index):
        return list(self._io)[index]

    def get_tensor_mode(self, name):
        return self._io[name][0]

    def get_tensor_dtype(self, name):
        return self._io[name][1]

    def get_tensor_profile_shape(self, name, profile_index):
        assert name == "images" and profile_index == 0
        return self._profile


class _FakeContext:
    """IExecutionContext: set_input_shape refuses batches outside the profile and set_tensor_address
    refuses misaligned addresses, returning False as TensorRT does."""

    def __init__(self, max_batch: int, refuse_addresses: bool = False):
        self.max_batch = max_batch
        self.refuse_addresses = refuse_addresses
        self.calls = []
        self.batch = None
        self.streams = []

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, shape))
        if not 1 <= shape[0] <= self.max_batch:
            return False
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        self.calls.append(("get_tensor_shape", name))
        return (self.batch, 4)

    def set_tensor_address(self, name, address):
        self.calls.append(("set_tensor_address", name, address))
        return not self.refuse_addresses and address % 256 == 0

    def execute_async_v3(self, stream_handle):
        self.streams.append(stream_handle)
        return True


def _engine(side=37, max_batch=8, context=None, logits_type=_DataType.FLOAT) -> TensorRTEngine:
    engine = TensorRTEngine.__new__(TensorRTEngine)  # what __init__ does after deserialising the plan
    engine._trt = FAKE_TRT
    engine.engine = _FakeEngine(side, max_batch, logits_type)
    engine.context = context or _FakeContext(max_batch)
    engine._describe_io()
    return engine


def test_split_views_are_bound_at_256_byte_aligned_addresses():
    engine = _engine()
    images = torch.randint(0, 256, (5, 3, 37, 37), dtype=torch.uint8)
    parts = torch.split(images, 2)  # 2*3*37*37 bytes per part: the later views start off any 256-byte boundary
    assert any(p.data_ptr() % 256 for p in parts)
    for part in parts:
        engine.context.calls.clear()
        outputs, (bound,) = engine.bind({"images": part})
        assert torch.equal(bound, part) and bound.data_ptr() % 256 == 0
        assert engine.context.calls == [
            ("set_input_shape", "images", tuple(part.shape)), ("set_tensor_address", "images", bound.data_ptr()),
            ("get_tensor_shape", "logits"), ("set_tensor_address", "logits", outputs["logits"].data_ptr())]
    aligned_part = aligned(parts[1])
    assert aligned(aligned_part).data_ptr() == aligned_part.data_ptr()  # aligned input: no copy


def test_a_batch_outside_the_profile_names_the_shape_and_the_profile():
    engine = _engine(max_batch=8)
    assert engine.max_batch == 8 and engine.profiles["images"][2] == (8, 3, 37, 37)
    with pytest.raises(TensorRTError, match=r"TensorRT refused input 'images' of shape \[16, 3, 37, 37\]: the engine's "
                                            r"profile takes \[1, 3, 37, 37\] to \[8, 3, 37, 37\]"):
        engine.bind({"images": torch.zeros(16, 3, 37, 37, dtype=torch.uint8)})


def test_a_refused_address_is_an_error():
    engine = _engine(context=_FakeContext(8, refuse_addresses=True))
    with pytest.raises(TensorRTError, match=r"TensorRT refused the address 0x[0-9a-f]+ of tensor 'images' "
                                            r"\(torch.uint8 \[2, 3, 37, 37\] on cpu\)"):
        engine.bind({"images": torch.zeros(2, 3, 37, 37, dtype=torch.uint8)})


def test_tensorrt_types_map_to_torch_or_fail_by_name():
    modules = [FAKE_TRT] + ([__import__("tensorrt")] if REAL_TENSORRT else [])
    for trt in modules:
        assert torch_dtype(trt, trt.DataType.BF16, "x") is torch.bfloat16
        assert torch_dtype(trt, trt.DataType.HALF, "x") is torch.float16
        assert torch_dtype(trt, trt.DataType.FP8, "x") is torch.float8_e4m3fn
        assert torch_dtype(trt, trt.DataType.INT64, "x") is torch.int64
        with pytest.raises(TensorRTError, match="engine tensor 'w' has TensorRT type INT4, which torch"):
            torch_dtype(trt, trt.DataType.INT4, "engine tensor 'w'")
    with pytest.raises(TensorRTError, match="engine tensor 'logits' has TensorRT type FP4"):
        _engine(logits_type=_DataType.FP4)  # refused when the engine loads, not at its first batch
    assert _engine(logits_type=_DataType.BF16).dtypes["logits"] is torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (TensorRT not needed: the context is a stand-in)")
def test_engine_runs_on_a_non_default_stream_without_synchronising(monkeypatch):
    class WritingContext(_FakeContext):
        def execute_async_v3(self, stream_handle):
            self.streams.append(stream_handle)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
                torch.cuda._sleep(50_000_000)  # a slow "engine": the caller must wait for it, not race it
                self.output.fill_(7.0)
            return True

    def no_sync(*args, **kwargs):
        raise AssertionError("the engine must not synchronise the host")

    engine = _engine(context=WritingContext(8))
    engine._stream = torch.cuda.Stream()
    original_bind = engine.bind

    def bind(inputs):
        outputs, bound = original_bind(inputs)
        engine.context.output = outputs["logits"]
        return outputs, bound

    engine.bind = bind
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", no_sync)
    images = torch.zeros(3, 3, 37, 37, dtype=torch.uint8, device="cuda")
    out = engine.run({"images": images})["logits"]
    assert engine.context.streams[-1] == engine._stream.cuda_stream != 0  # not the legacy default stream
    assert torch.equal(out.cpu(), torch.full((3, 4), 7.0))  # the caller's stream waited for TensorRT's
    mine = torch.cuda.Stream()
    with torch.cuda.stream(mine):
        out = engine.run({"images": images})["logits"]
        assert engine.context.streams[-1] == mine.cuda_stream  # a caller's own stream is used as it is
        assert torch.equal(out.cpu(), torch.full((3, 4), 7.0))


# --- ONNX Runtime's CUDA provider: device_id, use_tf32 and the CPU fallback ----------------------

@pytest.fixture
def session_spy(monkeypatch):
    created = []
    real = onnxruntime.InferenceSession

    def spy(path_or_bytes, sess_options=None, providers=None, **kwargs):
        created.append(providers)
        return real(path_or_bytes, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    cuda_provider_problem.cache_clear()
    yield created
    cuda_provider_problem.cache_clear()


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason=f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (onnxruntime-gpu missing)")
def test_cuda_sessions_get_device_id_and_no_tf32(fp32_graph, session_spy, monkeypatch):
    path, _ = fp32_graph
    if torch.cuda.is_available() and cuda_provider_problem(0) is None:  # a GPU the provider runs on
        session = make_ort_session(path, device=f"cuda:{torch.cuda.device_count() - 1}")
        options = session.get_provider_options()["CUDAExecutionProvider"]
        assert options["use_tf32"] == "0" and options["device_id"] == str(torch.cuda.device_count() - 1)
        return
    # No usable GPU: pretend torch sees two, so the provider is asked for, and fails to load here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ExportError, match=r"ONNX Runtime on CUDA needs a GPU and a CUDA provider that starts "
                                          r"\(cuda:1: ONNX Runtime lists its CUDAExecutionProvider but could not load"):
        make_ort_session(path, device="cuda:1")
    assert session_spy[-1][0] == ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"})
    with pytest.warns(RuntimeWarning, match="ONNX Runtime runs on the CPU: ONNX Runtime lists its CUDAExecutionProvider"):
        session = make_ort_session(path, device="auto")
    assert session.get_providers() == ["CPUExecutionProvider"] and session_spy[-1] == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="device must be cpu, cuda, cuda:N or auto, got 'gpu'"):
        make_ort_session(path, device="gpu")


def test_runtime_auto_falls_back_to_the_cpu_with_a_warning(monkeypatch, tmp_path_factory):
    from cnnbench import runtime
    import cnnbench.runtime.loader as loader

    run = tiny_run(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("auto-fallback")
    result = export_checkpoints([run["checkpoint"]], tensorrt="off", out=out, parity_images=4, progress=False)
    folder = result["exports"][0]["export_dir"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU that onnxruntime cannot use
    monkeypatch.setattr(loader, "resolve_device", lambda device: "cuda" if device in ("auto", "cuda") else device)
    from cnnbench import runtime
    import cnnbench.runtime.ort_backend  # noqa: F401  (loads the submodule)
    monkeypatch.setattr(runtime.ort_backend, "cuda_provider_problem", lambda index=0: "its CUDA libraries did not load")
    with pytest.warns(RuntimeWarning, match="onnxruntime runs this export on the CPU: its CUDA libraries did not load"):
        predictor = runtime.load(folder, backend="auto", device="auto")
    assert predictor.backend == "onnxruntime" and predictor.device == "cpu"


# --- TensorRT's int8 graph, and the export's static check ----------------------------------------

def test_tensorrt_int8_sibling_has_no_int32_bias_and_passes_the_parser_rules(fp32_graph, tmp_path, monkeypatch):
    path, io = fp32_graph
    given = []

    def build(onnx_path, plan_path, **kwargs):  # what TensorRT would be handed
        graph = onnx.load(onnx_path)
        given.append((graph, tensorrt_findings(graph)))
        return {"tensorrt_version": "fake", "profile": {}}

    monkeypatch.setattr(pipeline, "build_tensorrt_engine", build)
    calibration = torch.randn(8, 3, SPEC.crop, SPEC.crop, generator=torch.Generator().manual_seed(0))
    pipeline._build_plan("int8", str(tmp_path / "model_int8.onnx"), str(path), str(tmp_path / "model_int8.plan"), io,
                         calibration, {"max_batch": 2, "out": str(tmp_path)})
    ((graph, findings),) = given
    initializers = {t.name: t.data_type for t in graph.graph.initializer}
    dequantized = [initializers.get(n.input[0]) for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantized and set(dequantized) <= {onnx.TensorProto.INT8, None}  # weights int8, activations computed
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == sum(
        1 for n in graph.graph.node if n.op_type == "Conv" and len(n.input) == 3 and n.input[2] in initializers
        and initializers[n.input[2]] == onnx.TensorProto.FLOAT)  # every bias stays a float initializer
    assert findings == []


def test_onnx_runtime_int8_graph_keeps_its_int32_biases(fp32_graph, tmp_path):
    path, io = fp32_graph
    calibration = torch.randn(8, 3, SPEC.crop, SPEC.crop, generator=torch.Generator().manual_seed(0))
    settings = quantize_int8(path, tmp_path / "int8.onnx", calibration, io=io, activations="uint8")
    graph = onnx.load(tmp_path / "int8.onnx")
    initializers = {t.name: t.data_type for t in graph.graph.initializer}
    assert any(initializers.get(n.input[0]) == onnx.TensorProto.INT32
               for n in graph.graph.node if n.op_type == "DequantizeLinear")  # ONNX Runtime's integer kernels take them
    assert settings["bias"] == "int32 (dequantised)"
    with pytest.raises(TensorRTSupportError, match="is INT32; TensorRT's DequantizeLinear takes INT8/FP8/INT4"):
        pipeline._check_for_tensorrt(str(tmp_path / "int8.onnx"), "model_int8.onnx", strict=True)


def test_export_checks_every_graph_tensorrt_builds_from(tmp_path_factory, monkeypatch, capsys):
    run = tiny_run(tmp_path_factory.getbasetemp())
    checked = []
    real = pipeline.check_tensorrt_support

    def spy(path, *, strict, label=None):
        checked.append((os.path.basename(path), strict))
        findings = real(path, strict=strict, label=label)
        return findings + (["node x (Foo): made up to show the warning"] if path.endswith("model_fp16.onnx") else [])

    monkeypatch.setattr(pipeline, "check_tensorrt_support", spy)
    out = tmp_path_factory.mktemp("checked-export")
    export_checkpoints([run["checkpoint"]], fp16=True, tensorrt="off", out=out, parity_images=4, progress=False)
    assert checked == [("model.onnx", False), ("model_fp16.onnx", False)]  # no engine is built: warnings only
    err = capsys.readouterr().err
    assert "[export] warning: best/model_fp16.onnx: TensorRT's ONNX parser would reject 1 node(s), first: node x (Foo)" \
        in err.replace(os.path.basename(os.path.dirname(run["checkpoint"])), "best")


# --- GPU preprocessing: normalisation constants once per device ----------------------------------

@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_normalisation_constants_are_made_once_per_device(device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    made = []
    real = torch.tensor

    def counting(*args, **kwargs):
        made.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    spec = spec_for_crop(24)
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    for _ in range(3):
        out = normalize(images.to(device), spec)
    assert len(made) <= 2, made  # mean and std once for the device, not per batch
    if device == "cuda":
        assert torch.allclose(out.cpu(), normalize(images, spec))
    made.clear()
    normalize(images, spec)
    normalize(images, spec)
    assert len(made) == 4  # on the CPU they are plain constants (and traces keep their own)


# --- Dense ten crops on CUDA ---------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_ten_crops_run_on_cuda_as_on_the_cpu(tmp_path_factory):
    from cnnbench import runtime
    from cnnbench.common.device import ieee_fp32
    from cnnbench.models.dense import DenseTenCropModel

    run = tiny_run(tmp_path_factory.getbasetemp(), DENSE_SPEC)
    images = torch.randint(0, 256, (3, 3, DENSE_SPEC.resize, DENSE_SPEC.resize), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    on_cpu = runtime.load(run["checkpoint"], backend="torch", device="cpu").logits_from_images(images, crops="dense")
    # The torch backend wraps its model after moving it to the GPU (eval, predict, bench and gradcam all do this).
    on_gpu = runtime.load(run["checkpoint"], backend="torch", device="cuda").logits_from_images(images, crops="dense")
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    # A wrapper made first, then its model moved on its own: the windows follow the features.
    torch.manual_seed(0)
    model = create_model("resnet18", 4, width_mult=0.125).eval()
    dense = DenseTenCropModel(model, DENSE_SPEC).eval()
    with torch.no_grad(), ieee_fp32():
        expected = dense(images)
        model.cuda()
        torch.testing.assert_close(dense(images.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


# --- Packaging --------------------------------------------------------------------------------------

def test_extras_pick_the_cuda_major_of_the_installed_torch():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["tensorrt-cu12"] == ["tensorrt-cu12>=10.0"] and extras["tensorrt-cu13"] == ["tensorrt-cu13>=10.13"]
    assert extras["onnxruntime-cu12"][0].startswith("onnxruntime-gpu>=1.20,<1.27")
    assert extras["onnxruntime-cu13"][0].startswith("onnxruntime-gpu>=1.27")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for extra in ("tensorrt-cu12", "tensorrt-cu13", "onnxruntime-cu12", "onnxruntime-cu13"):
        assert f".[{extra}]" in readme
