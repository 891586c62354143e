"""Triton Inference Server for one exported model: its classifier and its CAM layer-gradient graph.

Run with the Python of the Triton virtualenv (``make triton-venv``: nvidia-pytriton, NumPy < 2,
the CPU torch) or inside NVIDIA's PyTriton/Triton image, on a folder written by
``pacs-xai triton export`` (:func:`service.inference.graphs.export_graphs`)::

    .venv-triton/bin/python service/tools/triton/serve.py var/triton-graphs --grpc-port 8001

It imports only torch, NumPy and pytriton, never this project (whose NumPy 2 and pydantic it does
not have): the folder holds ``torch.export`` programs and a ``spec.json``. Both models are bound
with Triton's dynamic batcher (``max_batch`` images per pass, ``max_queue_delay_us`` of waiting
for more), run under ``torch.no_grad`` on CUDA when there is one, else the CPU. Stops on SIGTERM
or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

log = logging.getLogger("pacs-xai-triton")


def _program(path: pathlib.Path, device: torch.device) -> torch.nn.Module:
    module = torch.export.load(str(path)).module()
    return module.to(device) if device.type != "cpu" else module


def bind(triton: Triton, folder: pathlib.Path, device: torch.device) -> list[str]:
    """Bind the folder's graphs to ``triton``; the model names bound."""
    spec = json.loads((folder / "spec.json").read_text())
    config = ModelConfig(
        max_batch_size=spec["max_batch"],
        batcher=DynamicBatcher(max_queue_delay_microseconds=spec["max_queue_delay_us"]),
    )
    image = Tensor(name="images", dtype=np.float32, shape=tuple(spec["input_shape"]))
    classifier = _program(folder / "classifier.pt2", device)

    @batch
    def classify(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits = classifier(torch.from_numpy(images).to(device))
        return {"logits": logits.float().cpu().numpy()}

    triton.bind(
        model_name=spec["classifier_model"],
        infer_func=classify,
        inputs=[image],
        outputs=[Tensor(name="logits", dtype=np.float32, shape=(spec["classes"],))],
        config=config,
        strict=True,
    )
    bound = [spec["classifier_model"]]
    if spec["cam_model"]:
        graph = _program(folder / "layer-gradients.pt2", device)

        @batch
        def layer_gradients(images: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                activations, gradients = graph(
                    torch.from_numpy(images).to(device), torch.from_numpy(targets.astype(np.int64)).to(device)
                )
            return {"activations": activations.float().cpu().numpy(), "gradients": gradients.float().cpu().numpy()}

        feature = tuple(spec["activation_shape"])
        triton.bind(
            model_name=spec["cam_model"],
            infer_func=layer_gradients,
            inputs=[image, Tensor(name="targets", dtype=np.int64, shape=(1,))],
            outputs=[
                Tensor(name="activations", dtype=np.float32, shape=feature),
                Tensor(name="gradients", dtype=np.float32, shape=feature),
            ],
            config=config,
            strict=True,
        )
        bound.append(spec["cam_model"])
    return bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve an exported pacs-xai model (classifier + CAM layer gradients) on Triton.",
        epilog="example: .venv-triton/bin/python service/tools/triton/serve.py var/triton-graphs --grpc-port 8001",
    )
    parser.add_argument("folder", type=pathlib.Path, help="folder written by `pacs-xai triton export`")
    parser.add_argument("--address", default="127.0.0.1", help="address of the gRPC, HTTP and metrics ports")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not (args.folder / "spec.json").is_file():
        print(f"{args.folder} holds no spec.json: write it with `pacs-xai triton export`", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TritonConfig(
        grpc_address=args.address,
        grpc_port=args.grpc_port,
        http_address=args.address,
        http_port=args.http_port,
        metrics_address=args.address,
        metrics_port=args.metrics_port,
    )
    with Triton(config=config) as triton:
        names = bind(triton, args.folder, device)
        log.info("serving %s on %s:%d (gRPC) with torch on %s", ", ".join(names), args.address, args.grpc_port, device)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
