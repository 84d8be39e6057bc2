"""Shared by the serving tests: a real `serve` process on loopback, started and stopped by its own PID."""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

STARTUP_SECONDS = 240  # a loaded 2-core machine: model load, Triton start, two Python-backend stubs per model


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Server:
    process: subprocess.Popen
    ready: dict  # the JSON line `serve --json` prints when every model has answered
    log: str

    @property
    def http(self) -> str:
        return self.ready["http"]

    @property
    def grpc(self) -> str:
        return self.ready["grpc"]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM to this server's PID; its exit code (it is killed, by PID, only if it does not exit)."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        return self.process.returncode


def start_server(models: list[str], log_dir, *extra: str) -> Server:
    http, grpc, metrics = free_ports(3)
    log = os.path.join(os.fspath(log_dir), f"serve-{http}.log")
    command = [sys.executable, "-m", "cnnbench", "serve", *models, "--json", "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--log", os.path.join(os.fspath(log_dir), f"triton-{http}.log"), *extra]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    server = Server(process, {}, log)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + STARTUP_SECONDS
    line = b""
    while time.monotonic() < deadline and process.poll() is None and not line.endswith(b"\n"):
        if selector.select(timeout=1):
            line += process.stdout.readline()
    selector.close()
    if not line.strip():
        server.stop()
        raise RuntimeError(f"serve did not become ready; its log {log}:\n" + open(log, errors="replace").read()[-3000:])
    server.ready = json.loads(line)
    return server
