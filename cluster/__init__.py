"""Inference past one machine: `predict` (and `eval`) as a Ray Data pipeline, on a private local Ray or a cluster.

CPU tasks decode and resize the images, model actors (one per GPU, or CPU actors with a share of the
cores) compute the logits, the driver streams the results to the same output files as local predict
(resumable). session.py: which Ray; pipeline.py: the Ray Data pipeline; predict.py, evaluate.py: the commands.
"""
from cnnbench.cluster.evaluate import evaluate_on_ray
from cnnbench.cluster.predict import predict_on_ray
from cnnbench.cluster.session import RayError, check_address, local_ray, ray_session

__all__ = ["RayError", "check_address", "evaluate_on_ray", "local_ray", "predict_on_ray", "ray_session"]
