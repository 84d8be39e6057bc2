"""The device's measured matrix-multiply peak per precision: the denominator of achieved FLOP/s.

Measured in the same run as the rows it divides, because a shared or throttled machine's real peak
is whatever it delivers now, not a datasheet figure. One BLAS is not always the fastest on a CPU
(MKL's fp32 GEMM trails OpenBLAS on AMD processors), so fp32 on the CPU takes the best of PyTorch
and NumPy, over two matrix sizes. int8 on the CPU takes the best of ``torch._int_mm`` (oneDNN) and
ONNX Runtime's MatMulInteger (uint8 x int8: MLAS, the kernels behind its quantised convolutions).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from bench.harness import measure
from common.device import cpu_flags

_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIDES = {"cpu": (1024, 2048), "cuda": (8192,)}
_SECONDS_PER_KERNEL = {"cpu": 0.4, "cuda": 0.5}


def peak_flops(precision: str, device: torch.device) -> dict:
    """``{"precision", "flops": FLOP/s or None, "kernel", "candidates", "note"}``.

    ``flops`` is the fastest single iteration of any candidate matmul. int8 counts integer
    operations (OP/s) through ``torch._int_mm``. A precision the device has no matrix kernel for
    (fp16 on a CPU without fp16 units, int8 without ``_int_mm``) gives None and a note instead of a
    misleading figure.
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
        kernels = [("torch._int_mm", lambda: torch._int_mm(a, b))] if hasattr(torch, "_int_mm") else []
        if device.type == "cpu":
            kernels.append(("onnxruntime MatMulInteger", _ort_int8_matmul(side, generator)))
        return kernels
    a = torch.randn(side, side, generator=generator).to(device=device, dtype=_FLOAT_DTYPES[precision])
    b = torch.randn(side, side, generator=generator).to(device=device, dtype=_FLOAT_DTYPES[precision])
    kernels = [("torch.mm", lambda: torch.mm(a, b))]
    if precision == "fp32" and device.type == "cpu":
        a_np, b_np = a.numpy(), b.numpy()
        kernels.append(("numpy.matmul", lambda: np.matmul(a_np, b_np)))
    return kernels


def _ort_int8_matmul(side: int, generator: torch.Generator) -> Callable[[], object]:
    """One MatMulInteger (uint8 [side, side] x int8 [side, side] -> int32) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [side, side]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [side, side])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [side, side])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any ONNX Runtime reads IR 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"a": torch.randint(0, 256, (side, side), dtype=torch.uint8, generator=generator).numpy(),
             "b": torch.randint(-128, 128, (side, side), dtype=torch.int8, generator=generator).numpy()}
    return lambda: session.run(None, feeds)
