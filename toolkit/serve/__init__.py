"""Serving: the Open Inference Protocol over HTTP (app, protocol, batching, metrics, auth) and Triton
model repositories for scale-out (triton). Stands on the runtime alone: no torch, no compile side."""

from toolkit.serve.app import ServeOptions, create_app, serve
from toolkit.serve.triton import package_triton

__all__ = ["ServeOptions", "create_app", "package_triton", "serve"]
