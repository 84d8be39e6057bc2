"""The device's measured matrix-multiply peak per precision: the denominator of achieved FLOP/s.

Measured in the same run as the rows it divides, because a shared or throttled machine's real peak
is whatever it delivers now, not a datasheet figure. One library is not always the fastest on a
CPU (MKL's fp32 GEMM trails OpenBLAS on AMD processors), so the CPU peak is the best of PyTorch,
NumPy (fp32) and ONNX Runtime (fp32 MatMul; int8 MatMulInteger, uint8 x int8, the MLAS kernels
behind its quantised convolutions) and OpenVINO (a MatMul compiled as the openvino backend compiles
graphs: fp32 with the f32 hint, bf16 where the CPU has bf16 units, int8 from a QDQ MatMul: AMX where
the CPU has it), over two matrix sizes. A backend's convolutions can still beat
these GEMMs (ONNX Runtime's fp32 NCHWc convolutions did, by a few percent): the fraction is then
reported above 100 % and flagged.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cnnbench.bench.harness import measure
from cnnbench.common.device import cpu_flags, cpu_has_fast_bf16

_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIDES = {"cpu": (1024, 2048), "cuda": (8192,)}
_SECONDS_PER_KERNEL = {"cpu": 0.4, "cuda": 0.5}
_INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def peak_flops(precision: str, device: torch.device) -> dict:
    """``{"precision", "flops": FLOP/s or None, "kernel", "candidates", "note"}``.

    ``flops`` is the fastest single iteration of any candidate matmul. int8 counts integer
    operations (OP/s): ``torch._int_mm`` (on a CPU only with int8 dot-product units), ONNX Runtime's
    and OpenVINO's int8 MatMul. A precision the device has no matrix units for (fp16 or bf16 on a CPU
    without them, int8 without ``_int_mm`` on CUDA) gives None and a note instead of a misleading figure.
    """
    unsupported = _unsupported_reason(precision, device)
    if unsupported:
        return {"precision": precision, "flops": None, "kernel": None, "candidates": {}, "note": unsupported}
    candidates, failures = {}, []
    for side in _SIDES[device.type]:
        for name, multiply in _kernels(precision, side, device):
            try:
                timing = measure(multiply, seconds=_SECONDS_PER_KERNEL[device.type], warmup=1, device=device)
            except RuntimeError as exc:
                failures.append(f"{name} {side}: {str(exc).splitlines()[0]}")
                continue
            candidates[f"{name} {side}x{side}"] = 2 * side**3 / min(timing.times_s)
    if not candidates:
        return {"precision": precision, "flops": None, "kernel": None, "candidates": {},
                "note": "matmul failed: " + "; ".join(failures)}
    best = max(candidates, key=candidates.get)
    return {"precision": precision, "flops": candidates[best], "kernel": best, "candidates": candidates,
            "note": f"fastest iteration of {best}"}


def _unsupported_reason(precision: str, device: torch.device) -> str | None:
    if precision not in (*_FLOAT_DTYPES, "int8"):
        return f"unknown precision {precision!r}"
    if device.type == "cpu" and precision == "fp16" and not {"avx512_fp16", "amx_fp16"} & cpu_flags():
        return "n/a: this CPU has no fp16 matrix units (fp16 graphs compute through fp32 here)"
    if device.type == "cpu" and precision == "bf16" and not cpu_has_fast_bf16():
        return "n/a: this CPU has no bf16 units (bf16 is emulated: no peak to compare with)"
    if precision == "int8" and device.type == "cuda" and not hasattr(torch, "_int_mm"):
        return "n/a: this PyTorch has no torch._int_mm"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "n/a: this GPU has no bf16"
    return None


def _kernels(precision: str, side: int, device: torch.device) -> list[tuple[str, Callable[[], object]]]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    if precision == "int8":
        a = torch.randint(-128, 128, (side, side), dtype=torch.int8, generator=generator).to(device)
        b = torch.randint(-128, 128, (side, side), dtype=torch.int8, generator=generator).to(device)
        # On a CPU without int8 dot-product units torch._int_mm is a slow fallback (11 s for one 2048^3
        # product on an AVX2 EPYC): only the runtimes' int8 kernels, which our int8 graphs run on, count there.
        int_mm = hasattr(torch, "_int_mm") and (device.type != "cpu" or bool(_INT8_DOT_FLAGS & cpu_flags()))
        kernels = [("torch._int_mm", lambda: torch._int_mm(a, b))] if int_mm else []
        if device.type == "cpu":
            kernels.append(("onnxruntime MatMulInteger", _ort_matmul("int8", side, generator)))
            kernels += _openvino_matmul("int8", side, generator)
        return kernels
    a = torch.randn(side, side, generator=generator).to(device=device, dtype=_FLOAT_DTYPES[precision])
    b = torch.randn(side, side, generator=generator).to(device=device, dtype=_FLOAT_DTYPES[precision])
    kernels = [("torch.mm", lambda: torch.mm(a, b))]
    if precision == "fp32" and device.type == "cpu":
        a_np, b_np = a.numpy(), b.numpy()
        kernels.append(("numpy.matmul", lambda: np.matmul(a_np, b_np)))
        kernels.append(("onnxruntime MatMul", _ort_matmul("fp32", side, generator)))
    if device.type == "cpu":
        kernels += _openvino_matmul(precision, side, generator)
    return kernels


def _ort_matmul(precision: str, side: int, generator: torch.Generator) -> Callable[[], object]:
    """One [side, side] x [side, side] product on ONNX Runtime's CPU provider: float32 MatMul, or
    MatMulInteger (uint8 x int8 -> int32) for int8."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if precision == "int8":
        op, types, out_type = "MatMulInteger", (TensorProto.UINT8, TensorProto.INT8), TensorProto.INT32
        feeds = {"a": torch.randint(0, 256, (side, side), dtype=torch.uint8, generator=generator).numpy(),
                 "b": torch.randint(-128, 128, (side, side), dtype=torch.int8, generator=generator).numpy()}
    else:
        op, types, out_type = "MatMul", (TensorProto.FLOAT, TensorProto.FLOAT), TensorProto.FLOAT
        feeds = {name: torch.randn(side, side, generator=generator).numpy() for name in ("a", "b")}
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])], f"{precision}_matmul",
        [helper.make_tensor_value_info(name, t, [side, side]) for name, t in zip(("a", "b"), types)],
        [helper.make_tensor_value_info("c", out_type, [side, side])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any ONNX Runtime reads IR 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def _openvino_matmul(precision: str, side: int, generator: torch.Generator) -> list[tuple[str, Callable[[], object]]]:
    """[side, side] x a constant [side, side] in OpenVINO, compiled as runtime.openvino_backend compiles an
    export's graphs (same precision hints, streams and threads); int8: the input quantised and the weights
    int8 through QuantizeLinear/DequantizeLinear, as in the QDQ graphs. [] where OpenVINO does not run
    this precision here (not installed; bf16 without bf16 units; fp16)."""
    from cnnbench.runtime.openvino_backend import OPENVINO_PRECISIONS, OpenVinoGraph, openvino_precisions, openvino_problem

    if openvino_problem("cpu") or precision not in openvino_precisions() or precision == "fp16":
        return []
    from onnx import TensorProto, helper, numpy_helper

    a = torch.randn(side, side, generator=generator).numpy()
    if precision == "int8":
        weights = torch.randint(-128, 128, (side, side), dtype=torch.int8, generator=generator).numpy()
        nodes = [helper.make_node("QuantizeLinear", ["a", "a_scale", "a_zero"], ["a_q"]),
                 helper.make_node("DequantizeLinear", ["a_q", "a_scale", "a_zero"], ["a_dq"]),
                 helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zero"], ["b_dq"]),
                 helper.make_node("MatMul", ["a_dq", "b_dq"], ["c"])]
        constants = {"b": weights, "a_scale": np.array(0.02, np.float32), "a_zero": np.array(128, np.uint8),
                     "b_scale": np.array(0.01, np.float32), "b_zero": np.array(0, np.int8)}
    else:
        nodes = [helper.make_node("MatMul", ["a", "b"], ["c"])]
        constants = {"b": torch.randn(side, side, generator=generator).numpy()}
    graph = helper.make_graph(
        nodes, f"{precision}_matmul", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", side])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", side])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    compiled = OpenVinoGraph(model.SerializeToString(), label=f"{precision} matmul", precision=precision)
    hint = OPENVINO_PRECISIONS[precision][1] or "default"
    return [(f"openvino MatMul ({hint})", lambda: compiled.run(a, ("c",)))]
