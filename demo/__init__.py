"""The main job: the whole pipeline on the embedded data set, ending in one report."""
from cnnbench.demo.pipeline import run_demo

__all__ = ["run_demo"]
