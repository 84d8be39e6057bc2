"""Serving: Triton Inference Server over the runtime's Predictors, its clients, load tests, model repositories.

`serve_models` runs PyTriton's bundled Triton on loopback (serve/server.py, serve/models.py);
`predict_over_server` is `predict --server` (serve/client.py).
"""
from cnnbench.serve.client import ServerError, TritonClient, predict_over_server
from cnnbench.serve.server import serve_models

__all__ = ["ServerError", "TritonClient", "predict_over_server", "serve_models"]
