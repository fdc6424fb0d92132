"""A bounded load test of `huatuo-lite serve`, from a second process, over loopback only.

    python bench/load_test.py                                  # tiny torch model, served here
    python bench/load_test.py --model ./hv7b-gguf --requests 32 --concurrency 4
    python bench/load_test.py --url http://127.0.0.1:8080 --api-key KEY

With --model (or nothing: a tiny random model is made) the server is started
as a child process on a free loopback port and stopped at the end. It sends a
fixed number of chat completions (one image as a data URI, greedy) from
--concurrency client threads; no request starts after --time-limit and each
may take --request-timeout, so the run ends within their sum. It prints
requests/s and latency percentiles.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "examples" / "chest_xray.png"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_healthy(base: str, key: str | None, server: subprocess.Popen | None, timeout: float,
                 log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(base + "/health", headers=headers)
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            sys.exit(f"{tail}\nThe server exited with code {server.returncode} before it was ready.")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    sys.exit(f"The server at {base} was not healthy after {timeout:.0f} s.")


def start_server(model: str, backend: str | None, key: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`huatuo-lite serve` as a child process; its output goes to `log` (shown if it fails)."""
    port = free_port()
    command = [sys.executable, "-m", "huatuo_lite.cli", "serve", "-m", model, "--host", "127.0.0.1",
               "--port", str(port), "--api-key", key, "--threads", str(threads), "-q"]
    command += ["-b", backend] if backend else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HUATUO_LITE_NO_NOTICE": "1"}
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def noise_png(seed: int, side: int = 336) -> bytes:
    """A distinct image per request, so the server's image-feature cache cannot help."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def run_load(base: str, key: str | None, model_id: str, args) -> dict:
    """--requests completions from --concurrency threads, none started after --time-limit."""
    fixed = data_uri(Path(args.image).read_bytes())
    deadline = time.monotonic() + args.time_limit
    counter, lock = iter(range(args.requests)), threading.Lock()
    latencies, tokens, failures = [], [], []

    def client():
        while True:
            with lock:
                index = next(counter, None)
            if index is None or time.monotonic() >= deadline:
                return
            uri = data_uri(noise_png(index)) if args.distinct_images else fixed
            body = {"model": model_id, "temperature": 0, "max_tokens": args.max_tokens, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": f"Request {index}: what is shown?"}]}]}
            start = time.perf_counter()
            try:
                reply = post(base + "/v1/chat/completions", body, key, timeout=args.request_timeout)
            except (urllib.error.URLError, OSError) as exc:
                failures.append(str(exc))
                continue
            latencies.append(time.perf_counter() - start)
            tokens.append(reply["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests_ok": len(latencies), "requests_failed": len(failures), "concurrency": args.concurrency,
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3), "latency_max_s": round(float(lat.max()), 3),
            "completion_tokens_per_s": round(sum(tokens) / wall, 2), "max_tokens": args.max_tokens,
            "distinct_images": args.distinct_images,
            "first_failure": failures[0] if failures else None}


def tiny_model(folder: Path) -> str:
    from huatuo_lite.convert.tiny.make import make_tiny

    return str(make_tiny(folder / "model", variant="7b", seed=0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="A running server (loopback only); otherwise one is started.")
    parser.add_argument("--model", help="Model to serve (default: a tiny random 7B-shaped model).")
    parser.add_argument("--backend", help="Backend for the served model (default: torch for the tiny model).")
    parser.add_argument("--api-key", help="Key of a running --url server.")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=120.0, help="Seconds; no request starts after it.")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="Seconds one request may take (requests in flight at the time limit finish).")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="Threads of a server started here.")
    parser.add_argument("--image", default=str(EXAMPLE), help="The image every request sends.")
    parser.add_argument("--distinct-images", action="store_true",
                        help="A different noise image per request (no feature-cache hits) instead of --image.")
    args = parser.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        sys.exit("This load test only talks to loopback servers (127.0.0.1 / localhost).")

    with tempfile.TemporaryDirectory(prefix="huatuo-load-") as tmp:
        server, key, base, log = None, args.api_key, args.url, Path(tmp) / "server.log"
        if base is None:
            model = args.model or tiny_model(Path(tmp))
            key = "load-test-" + os.urandom(8).hex()
            backend = args.backend or (None if args.model else "torch")
            server, base = start_server(model, backend, key, args.threads, log)
        try:
            wait_healthy(base, key, server, timeout=300, log=log if server else None)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            listing = urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=headers))
            model_id = json.loads(listing.read())["data"][0]["id"]
            post(base + "/v1/chat/completions", {"model": model_id, "max_tokens": 1,     # warm-up, not counted
                                                 "messages": [{"role": "user", "content": "Hi?"}]}, key, 120)
            print(json.dumps(run_load(base, key, model_id, args), indent=2))
        finally:
            if server is not None:
                server.terminate()
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    server.kill()


if __name__ == "__main__":
    main()
