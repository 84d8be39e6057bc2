"""`serve` against the real Triton server (PyTriton's bundled build) on loopback: served answers equal
local `predict`'s through HTTP and gRPC, bad requests get their own named errors while the server keeps
serving, and SIGTERM during load answers every request and exits 0."""
from __future__ import annotations

import json
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from cnnbench import export, runtime  # noqa: E402
from cnnbench.cli import cli  # noqa: E402
from cnnbench.data.transforms import resize_uint8  # noqa: E402
from cnnbench.data.images import load_rgb  # noqa: E402
from cnnbench.serve import ServerError, TritonClient, predict_over_server  # noqa: E402
from runtime_testlib import held_out_images, tiny_run  # noqa: E402
from serve_testlib import start_server  # noqa: E402

MAX_BATCH = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, held-out image paths) of the tiny checkpoint, fp32, crops cut outside the graph."""
    torch.manual_seed(0)
    run = tiny_run(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("serve-export")
    result = export.export_checkpoints([run["checkpoint"]], tensorrt="off", max_batch=MAX_BATCH, out=str(out),
                                       parity_images=8, progress=False)
    return result["exports"][0]["export_dir"], held_out_images(run)[0][:6]


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """One server (crops 10) for the whole module; the last test stops it with SIGTERM."""
    server = start_server([exported[0]], tmp_path_factory.mktemp("serve-log"), "--crops", "10",
                          "--max-batch", str(MAX_BATCH), "--backend", "onnxruntime", "--device", "cpu")
    yield server
    server.stop()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels (a decompression bomb's header; no pixel data)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def resized(paths: list[str], spec) -> np.ndarray:
    return np.stack([resize_uint8(load_rgb(p), spec).numpy() for p in paths])


def assert_same_predictions(served: list[dict], local: list[dict]) -> None:
    assert [r["path"] for r in served] == [r["path"] for r in local]
    for s, l in zip(served, local):
        assert [t["class"] for t in s["top"]] == [t["class"] for t in l["top"]], s["path"]
        assert np.allclose([t["prob"] for t in s["top"]], [t["prob"] for t in l["top"]], atol=1e-6), s["path"]


def check_against_local(server, export_dir: str, paths: list[str], crops) -> None:
    predictor = runtime.load(export_dir, backend="onnxruntime", device="cpu")
    name = server.ready["models"][0]["name"]
    images = resized(paths, predictor.spec)
    expected = predictor.logits_from_images(torch.from_numpy(images), crops).numpy()
    local = runtime.predict_files(export_dir, paths, backend="onnxruntime", device="cpu", crops=crops, topk=3,
                                  workers=0, progress=False)["results"]
    for url in (server.http, server.grpc):
        client = TritonClient(url)
        logits, classes = client.infer_images(name, images)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
        labels = [row[0].decode().split(":", 2)[2] for row in classes]
        assert labels == [predictor.classes[i] for i in expected.argmax(axis=1)]
        served = predict_over_server(url, name, paths, topk=3)
        assert served["ok"] and served["succeeded"] == len(paths)
        assert_same_predictions(served["results"], local)


def test_served_answers_equal_local_predict_ten_crops(server, exported):
    check_against_local(server, exported[0], exported[1], 10)
    assert server.ready["models"][0]["crops"] == 10 and server.ready["address"] == "127.0.0.1"


def test_served_answers_equal_local_predict_centre_crop(exported, tmp_path):
    single = start_server([exported[0]], tmp_path, "--crops", "1", "--max-batch", str(MAX_BATCH),
                          "--backend", "onnxruntime", "--device", "cpu")
    try:
        check_against_local(single, exported[0], exported[1], 1)
    finally:
        assert single.stop() == 0


def test_predict_server_prints_what_local_predict_prints(server, exported, tmp_path):
    paths = exported[1][:3] + [str(tmp_path / "missing.jpg")]
    (tmp_path / "text.jpg").write_bytes(b"not an image at all\n" * 8)
    paths.append(str(tmp_path / "text.jpg"))
    runner = CliRunner()
    local = runner.invoke(cli, ["predict", *paths, "--model", exported[0], "--backend", "onnxruntime",
                                "--device", "cpu", "--topk", "3"])
    for url in (server.http, server.grpc):
        served = runner.invoke(cli, ["predict", *paths, "--server", url, "--served-model",
                                     server.ready["models"][0]["name"], "--topk", "3"])
        assert served.stdout == local.stdout  # stdout only: the local run's progress bar is on stderr
        assert served.exit_code == local.exit_code == 1  # two files failed, in both
    assert "not an image file" in local.stdout and "file not found" in local.stdout


def test_bad_requests_get_named_errors_and_the_server_keeps_serving(server, exported):
    name = server.ready["models"][0]["name"]
    side = server.ready["models"][0]["input"][2][1]
    jpeg = open(exported[1][0], "rb").read()
    uploads = {
        "not an image file": b"just some text, not an image\n" * 10,
        "truncated image": jpeg[: len(jpeg) // 2],
        "empty file (0 bytes)": b"",
        "refused as a possible decompression bomb": png_claiming(20_000, 20_000),
    }
    good = resized(exported[1][:1], runtime.load(exported[0], device="cpu").spec)
    for url in (server.http, server.grpc):
        client = TritonClient(url)
        before = client.infer_images(name, good)[0]
        for reason, data in uploads.items():
            with pytest.raises(ServerError, match=reason.replace("(", r"\(").replace(")", r"\)")):
                client.infer_files(name + ".encoded", [data])
        with pytest.raises(ServerError, match="data-type is 'FP32', but model .* expects 'UINT8'"):
            client._infer(name, "images", good.astype(np.float32), "FP32")
        with pytest.raises(ServerError, match="unexpected shape for input 'images'"):
            client.infer_images(name, np.zeros((1, 3, side + 1, side), dtype=np.uint8))
        with pytest.raises(ServerError, match=f"batch-size must be <= {MAX_BATCH}"):
            client.infer_images(name, np.repeat(good, MAX_BATCH + 1, axis=0))
        with pytest.raises(ServerError, match="unknown model"):
            client.infer_images("no-such-model", good)
        # A bad upload in a request of its own fails alone: a good one sent at the same time is answered.
        answers = {}
        threads = [threading.Thread(target=lambda k=k, d=d: answers.__setitem__(k, _try(client, name, d)))
                   for k, d in (("bad", b""), ("good", jpeg))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert isinstance(answers["bad"], ServerError) and isinstance(answers["good"], tuple)
        np.testing.assert_array_equal(client.infer_images(name, good)[0], before)
    _disconnect_mid_request(server.http, name, jpeg)
    np.testing.assert_array_equal(TritonClient(server.grpc).infer_images(name, good)[0], before)
    assert server.alive() and server.process.pid == server.ready["pid"]


def _disconnect_mid_request(http_url: str, name: str, data: bytes) -> None:
    """Clients that hang up: one halfway through sending its body, one before reading its answer."""
    host, port = http_url.split("//")[1].split(":")
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [data.decode("latin-1")]}]}).encode()
    head = (f"POST /v2/models/{name}.encoded/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for sent in (head + body[: len(body) // 2], head + body):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(sent)


def _try(client, name, data):
    try:
        return TritonClient(f"{client.protocol}://{client.address}").infer_files(name + ".encoded", [data])
    except ServerError as e:
        return e


def test_bench_server_drives_perf_analyzer_beside_the_in_process_rate(server, exported):
    from cnnbench.serve.perf import PerfAnalyzerError, find_perf_analyzer

    try:
        find_perf_analyzer()
    except PerfAnalyzerError as e:
        if "libb64" not in str(e):
            raise
        pytest.skip(str(e))  # a system library (.ci/run installs it); the pip parts come with [serve]
    result = CliRunner().invoke(cli, ["bench", exported[0], "--server", server.grpc, "--batch", "2", "--concurrency",
                                      "1:2", "--seconds", "1", "--trials", "8", "--backend", "onnxruntime",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == server.ready["models"][0]["name"] and report["failed_requests"] == 0
    assert [row["concurrency"] for row in report["rows"]] == [1, 2]
    assert report["requests"] > 0 and report["in_process"]["images_per_s"] > 0
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["vs_in_process"] == pytest.approx(row["images_per_s"] / report["in_process"]["images_per_s"])
    with pytest.raises(Exception, match="this machine only"):
        from cnnbench.serve.perf import bench_server

        bench_server("http://192.0.2.1:8000", served_model="x")


def test_sigterm_during_load_answers_every_request_and_exits_zero(server, exported, tmp_path):
    """Last in the module: stops the module's server, then starts it again."""
    name = server.ready["models"][0]["name"]
    data = open(exported[1][0], "rb").read()
    outcomes: list = []
    lock = threading.Lock()
    started = threading.Event()

    def client_loop(url):
        client = TritonClient(url)
        for _ in range(40):  # bounded: at most 40 requests per client
            try:
                outcome = client.infer_files(name + ".encoded", [data])
            except (ServerError, Exception) as e:  # noqa: B014 - a refused connection after exit is an answer too
                outcome = e
            with lock:
                outcomes.append(outcome)
            started.set()
            if isinstance(outcome, Exception):
                return

    threads = [threading.Thread(target=client_loop, args=(url,)) for url in (server.http, server.grpc) * 2]
    for t in threads:
        t.start()
    assert started.wait(60)
    assert server.stop() == 0
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request got no answer"
    answered = [o for o in outcomes if isinstance(o, tuple)]
    assert answered, "no request was answered before the stop"
    assert all(isinstance(o, (tuple, Exception)) for o in outcomes)
    out, _ = server.process.communicate(timeout=10)
    assert b'"stopped_by": "SIGTERM"' in out

    again = start_server([exported[0]], tmp_path, "--max-batch", str(MAX_BATCH), "--backend", "onnxruntime",
                         "--device", "cpu")
    try:
        logits, _ = TritonClient(again.grpc).infer_files(name + ".encoded", [data])
        np.testing.assert_allclose(logits, answered[0][0], rtol=0, atol=1e-5)
    finally:
        assert again.stop() == 0
