"""The exported LiteMedSAM image encoder on onnxruntime's CPU provider: ms per call, compared in one process.

Exports the encoder as ``samadapt export`` does (with TinyViT's export graph forms, ``models/tiny_vit.py``), and
also without stage 0's strips (``--no-strips``) and any other encoder graphs given (``--against``, e.g. one exported
on an older commit). The sessions run interleaved, best of ``--repeats``, on one 256 x 256 input; each row gives
the largest absolute difference to torch's ``encode_image``. ``--profile`` adds onnxruntime's per-op-type time of the
first graph (ms per call).

    taskset -c 1 .venv/bin/python bench/onnx_encoder.py [--threads 1] [--repeats 7] [--no-strips] [--profile]
                                                       [--against old_encoder.onnx ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch


def export_encoder(model, path: Path) -> None:
    from samadapt.export.onnx import _Encoder, _export

    size = model.img_size
    dynamic = {"images": {0: "batch"}, "image_embeddings": {0: "batch"}}
    _export(_Encoder(model), (torch.rand(1, 3, size, size),), path, ["images"], ["image_embeddings"], dynamic, 17)


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = profile
    options.profile_file_prefix = str(path.with_suffix(""))  # the trace goes beside the graph, not into the cwd
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_profile(path: Path, threads: int, images: np.ndarray, calls: int = 4) -> dict[str, float]:
    """onnxruntime's kernel time per op type, ms per call."""
    profiled = session(path, threads, profile=True)
    for _ in range(calls):
        profiled.run(None, {"images": images})
    totals: collections.Counter = collections.Counter()
    trace = Path(profiled.end_profiling())
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / calls
    trace.unlink()
    return dict(totals.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-strips", action="store_true", help="also export stage 0 without strips of rows")
    parser.add_argument("--against", nargs="*", default=[], help="other encoder graphs to time")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from samadapt.export.onnx import deployable_copy
    from samadapt.runs import load_run

    model, _ = deployable_copy(load_run("lite_medsam", device="cpu").model)
    images = torch.rand(1, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.encode_image(images).numpy()
    with tempfile.TemporaryDirectory(prefix="onnx_encoder_") as folder:
        compare(model, expected, images.numpy(), Path(folder), args)


def compare(model, expected: np.ndarray, images: np.ndarray, folder: Path, args: argparse.Namespace) -> None:
    from samadapt.accel import strips

    graphs = {"export": folder / "encoder.onnx"}
    export_encoder(model, graphs["export"])
    if args.no_strips:
        large_hidden = strips.large_hidden
        strips.large_hidden = lambda x, hidden, itemsize: False
        try:
            export_encoder(model, folder / "no_strips.onnx")
        finally:
            strips.large_hidden = large_hidden
        graphs["export, no strips"] = folder / "no_strips.onnx"
    graphs.update({Path(path).name: Path(path) for path in args.against})

    feeds = {"images": images}
    sessions = {name: session(path, args.threads) for name, path in graphs.items()}
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(args.repeats):
        for name, runner in sessions.items():
            start = time.perf_counter()
            runner.run(None, feeds)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), best of {args.repeats}, interleaved")
    for name, runner in sessions.items():
        error = float(np.abs(runner.run(None, feeds)[0] - expected).max())
        print(f"  {name:40s} {best[name] * 1e3:8.1f} ms   max |onnx - torch| {error:.1e}")
    if args.profile:
        print(f"per op type, {next(iter(graphs))} (ms per call):")
        for op, ms in op_profile(next(iter(graphs.values())), args.threads, feeds["images"]).items():
            if ms >= 0.5:
                print(f"  {op:30s} {ms:7.1f}")


if __name__ == "__main__":
    main()
