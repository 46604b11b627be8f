"""Latency of ``samadapt serve`` over real HTTP: ``python -m samadapt.serve.bench [--out docs/app-latency.md]``.

Starts the app in-process (uvicorn on a free port, LiteMedSAM, the demo datasets) and measures, as the page would
ask for them:

- click after the slice is cached: decoder only; server time (inside the handler) and round trip (HTTP client);
- first mask on a new slice: encoder + decoder;
- propagation through the MNI152 template (189 slices along Z) from a box on its middle slice: slices reached,
  seconds, seconds per slice;
- a corrective click on five of the propagated slices, each carried to the neighbours until the change dies out
  (``settle``, as the page does after a click on a propagated slice): milliseconds until the volume is updated.

Numbers are medians (and 90th percentiles) of ``--clicks`` clicks. The CPU load of the machine at the time is
printed with them: other processes slow both the encoder and the decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as response:
        return response.read()


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} (p90 {np.percentile(values, 90):.0f})"


def run_bench(clicks: int = 20, device: str = "cpu") -> dict:
    import uvicorn

    from samadapt.data.demo import fetch_demo
    from samadapt.data.io import read_label
    from samadapt.inference import load_predictor
    from samadapt.prompts import box_from_mask
    from samadapt.serve import Workspace, create_app

    demo = fetch_demo()
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="samadapt-serve-bench-"))
    workspace = Workspace(load_predictor("lite_medsam", device=device), demo=demo, state_dir=state, device=device)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(workspace), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    results: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "machine": platform.processor()}
    try:
        image = demo["lesions"] / "imagesTr" / "brain1.nrrd"
        truth = read_label(demo["lesions"] / "labelsTr" / "brain1.nrrd").array > 0
        session = _post(f"{url}/api/open", {"path": str(image)})["session"]
        workspace._prefetch.submit(lambda: None).result()  # let the open's background encode finish
        time.sleep(0.5)
        first, warm = [], []
        server_first, server_warm = [], []
        for index in (11, 13, 15, 17, 19):  # new slices: the page does not prefetch them here
            ys, xs = np.nonzero(truth[16])
            body = {"session": session, "axis": 0, "index": index, "object": 1}
            start = time.perf_counter()
            answer = _post(f"{url}/api/prompt", {**body, "box": [int(v) for v in box_from_mask(truth[16])]})
            first.append((time.perf_counter() - start) * 1000)
            server_first.append(answer["server_ms"])
            for k in range(clicks // 5):
                start = time.perf_counter()
                answer = _post(f"{url}/api/prompt", {**body, "point": [int(xs.mean()) + k, int(ys.mean()), 1]})
                warm.append((time.perf_counter() - start) * 1000)
                server_warm.append(answer["server_ms"])
                assert not answer["encoded"]
        results["click_cached_server_ms"] = _stats(server_warm)
        results["click_cached_round_trip_ms"] = _stats(warm)
        results["first_mask_server_ms"] = _stats(server_first)
        results["first_mask_round_trip_ms"] = _stats(first)

        mni = demo["mni152"] / "imagesTr" / "mni152.nii.gz"
        tissue = read_label(demo["mni152"] / "labelsTr" / "mni152.nii.gz").array > 0
        session = _post(f"{url}/api/open", {"path": str(mni)})["session"]
        middle = tissue.shape[0] // 2
        body = {"session": session, "axis": 0, "index": middle, "object": 1}
        _post(f"{url}/api/prompt", {**body, "box": [int(v) for v in box_from_mask(tissue[middle])]})
        start = time.perf_counter()
        job = _post(f"{url}/api/propagate", body)
        while job["state"] == "running":
            time.sleep(0.2)
            job = json.loads(_get(f"{url}/api/jobs/{job['id']}"))
        seconds = time.perf_counter() - start
        reached = len(job["result"]["slices"])
        results["propagation"] = (
            f"{reached} of {tissue.shape[0] - 1} slices in {seconds:.1f} s, {seconds / max(reached, 1):.2f} s per slice"
        )
        results["propagation_100_slices_s"] = round(100 * seconds / max(reached, 1), 1)
        results.update(_corrections(url, body, tissue, sorted(job["result"]["slices"])))
    finally:
        server.should_exit = True
        workspace.close()
    results["load_after"] = os.getloadavg()
    return results


def _corrections(url: str, body: dict, truth: np.ndarray, carried: list[int]) -> dict:
    """A corrective click (the simulated user's, ``prompts.corrective_click``) on five propagated slices around the
    middle of the object, each carried to the neighbours (``settle``) as the page does: ms from the click to the
    end of the re-propagation, and the slices each re-propagation visited."""
    import base64

    from samadapt.prompts import corrective_click

    total, visited = [], []
    middle = len(carried) // 2
    for index in carried[max(0, middle - 2) : middle + 3]:
        plane = json.loads(_get(f"{url}/api/labels/{body['session']}?axis=0&index={index}"))
        labels = np.frombuffer(base64.b64decode(plane["labels"]), "<u2").reshape(plane["h"], plane["w"])
        click = corrective_click(truth[index], labels == body["object"])
        if click is None:
            continue
        start = time.perf_counter()
        answer = _post(f"{url}/api/prompt", {**body, "index": index, "point": [click.x, click.y, int(click.positive)]})
        reached = []
        if answer["neighbours"]:
            job = _post(f"{url}/api/propagate", {**body, "index": index, "settle": True})
            while job["state"] == "running":
                time.sleep(0.01)
                job = json.loads(_get(f"{url}/api/jobs/{job['id']}"))
            reached = job["result"]["slices"]
        total.append((time.perf_counter() - start) * 1000)
        visited.append(len(reached))
    return {
        "correction_ms": _stats(total) if total else "n/a",
        "correction_slices": visited,
        "carried_object_slices": len(carried) + 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    results = run_bench(args.clicks, args.device)
    lines = [
        f"LiteMedSAM, {args.device}, {results['cpus']} CPUs, load average {results['load_before'][0]:.1f} before / "
        f"{results['load_after'][0]:.1f} after",
        "",
        "| measure | server ms | round trip ms |",
        "|---|---|---|",
        f"| click, slice cached (decoder only) | {results['click_cached_server_ms']} "
        f"| {results['click_cached_round_trip_ms']} |",
        f"| first mask on a new slice (encoder + decoder) | {results['first_mask_server_ms']} "
        f"| {results['first_mask_round_trip_ms']} |",
        "",
        f"Propagation through MNI152 from its middle slice: {results['propagation']} "
        f"(100 slices: {results['propagation_100_slices_s']} s).",
        "",
        f"A corrective click on a slice of that {results['carried_object_slices']}-slice object, carried to its "
        f"neighbours until the change dies out (click to the end of the re-propagation, as the page waits): "
        f"{results['correction_ms']} ms; slices re-propagated per click: {results['correction_slices']}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
