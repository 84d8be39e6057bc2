"""The serving pieces that need no running server: URLs, error texts, names, model loading and warm-up."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")

from cnnbench.common.errors import InputError  # noqa: E402
from cnnbench.runtime.predictor import BackendError  # noqa: E402
from cnnbench.serve.client import parse_server, server_reason  # noqa: E402
from cnnbench.serve.models import ImageRejected, decode_upload, triton_name  # noqa: E402
from cnnbench.serve.server import load_models  # noqa: E402
from runtime_testlib import tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:8000", ("http", "127.0.0.1:8000")),
    ("grpc://localhost:8001", ("grpc", "localhost:8001")),
    ("127.0.0.1:8000", ("http", "127.0.0.1:8000")),
])
def test_server_urls(url, expected):
    assert parse_server(url) == expected


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "http://127.0.0.1", "http://127.0.0.1:8000/v2", "grpc://:8001"])
def test_bad_server_urls_are_named(url):
    with pytest.raises(InputError, match="HOST:PORT"):
        parse_server(url)


def test_server_reason_keeps_the_upload_reason_and_drops_the_traceback():
    message = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
               f"{ImageRejected.__module__}.ImageRejected: row 0: truncated image (file ends early)\n\n\n\nAt:\n  m.py(501)")
    assert server_reason(message) == "truncated image (file ends early)"
    assert server_reason("[request id: <id_unknown>] inference request batch-size must be <= 8") == \
        "[request id: <id_unknown>] inference request batch-size must be <= 8"


def test_triton_names_keep_only_allowed_characters():
    assert triton_name("ensemble-resnet26+xception_small") == "ensemble-resnet26_xception_small"
    assert triton_name("a.b-c_d") == "a.b-c_d"


def test_uploads_are_decoded_by_the_project_decoder(run, tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (10, 20, 30)).save(buffer, format="PNG")
    image = decode_upload(buffer.getvalue())
    assert image.size == (5, 3) and image.getpixel((0, 0)) == (10, 20, 30)
    from cnnbench.data.images import ImageError

    with pytest.raises(ImageError, match="empty file"):
        decode_upload(b"")


def test_load_models_names_warms_up_and_checks_the_crop_mode(run):
    models = load_models([run["checkpoint"], run["checkpoint"]], backend="torch", device="cpu", precision="fp32",
                         crops=1, topk=9)
    assert [m.name for m in models] == ["runtime-tiny", "runtime-tiny-2"]
    assert models[0].topk == 4  # at most the number of classes
    images = np.zeros((2, *models[0].image_shape), dtype=np.uint8)
    answer = models[0].answer(images)
    assert answer["logits"].shape == (2, 4) and answer["classes"].shape == (2, 4)
    probability, index, label = answer["classes"][0, 0].decode().split(":", 2)
    assert label == models[0].predictor.classes[int(index)] and int(index) == answer["logits"][0].argmax()
    with pytest.raises(InputError, match="crops must be"):
        load_models([run["checkpoint"]], backend="torch", device="cpu", precision="fp32", crops=3, topk=5)


def test_a_crop_mode_the_export_cannot_compute_fails_before_the_server_starts(run, tmp_path):
    from cnnbench import export

    exported = export.export_checkpoints([run["checkpoint"]], ten_crop="graph", tensorrt="off", max_batch=2,
                                         out=str(tmp_path), parity_images=8, progress=False)["exports"][0]
    with pytest.raises(BackendError, match="crops=10 only"):
        load_models([exported["export_dir"]], backend="onnxruntime", device="cpu", precision="fp32", crops=1, topk=5)


def test_a_taken_port_is_named_before_anything_loads(tmp_path):
    import socket

    from cnnbench.serve import serve_models
    from serve_testlib import free_ports

    http, metrics = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"127.0.0.1:{port} .*--grpc-port"):
            serve_models([str(tmp_path / "never-loaded.pt")], grpc_port=port, http_port=http, metrics_port=metrics)
    with pytest.raises(InputError, match="must differ"):
        serve_models([str(tmp_path / "never-loaded.pt")], http_port=9000, grpc_port=9000, metrics_port=9001)
