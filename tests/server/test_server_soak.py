"""The server over many requests (1000, opt-in: `pytest --long`) and the id it announces."""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import huatuo_lite.api as api  # noqa: E402
from support.server_http import DEMO, free_port, noise_png, raw, rss_mb, user  # noqa: E402

LEAK_BYTES_PER_REQUEST = 10 * 1024     # a leak this size per request would add 10 MB over 1000


def memory_requests(n_images: int):
    """The rotation each round of the RSS test sends: answers, streams, refusals."""
    images = ["data:image/png;base64," + base64.b64encode(noise_png(i)).decode() for i in range(n_images)]
    for index in itertools.count():
        image = images[index % n_images]
        yield [{"messages": user("What is seen?", image), "max_tokens": 2, "temperature": 0},
               {"messages": user("Stream?", image), "max_tokens": 2, "stream": True,
                "stream_options": {"include_usage": True}},
               {"messages": user("x", "xy:scan.png"), "max_tokens": 2},
               b'{"messages": [{"role": "user", "content": "\\ud800"}]}'][index % 4]


@pytest.mark.long
@pytest.mark.skipif(not DEMO.is_dir() or not Path("/proc/self/status").exists(),
                    reason="needs models/demo and /proc")
def test_rss_stays_flat_over_1000_requests(tmp_path):
    """`huatuo-lite serve` on the demo model: resident memory after 1000 more
    requests (answers, streams, refusals) is within a small leak's worth of
    what it was after a warm-up that filled the image cache and the allocators."""
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "huatuo_lite.cli", "serve", "-m", str(DEMO), "--port", str(port),
                               "--threads", "1", "-q"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HUATUO_LITE_NO_NOTICE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(OSError):
                if raw(base + "/health", key=None)[0] == 200:
                    break
            time.sleep(0.2)
        loaded = rss_mb(server.pid)
        requests = memory_requests(8)
        statuses = {}
        for count in (200, 1000):
            for body in itertools.islice(requests, count):
                status = raw(base + "/v1/chat/completions", body, key=None)[0]
                statuses[status] = statuses.get(status, 0) + 1
            if count == 200:
                warm = rss_mb(server.pid)
        after = rss_mb(server.pid)
        print(f"serve RSS: loaded {loaded:.1f} MB, after 200 warm-up requests {warm:.1f} MB, "
              f"after 1000 more {after:.1f} MB; statuses {statuses}")
        assert statuses == {200: 600, 400: 600}
        assert after - warm < 1000 * LEAK_BYTES_PER_REQUEST / 2**20
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def test_the_announced_id_is_the_models_name_and_quant(tmp_path):
    from types import SimpleNamespace

    from huatuo_lite.model_name import model_name

    snapshot = tmp_path / "hub" / "models--FreedomIntelligence--HuatuoGPT-Vision-7B" / "snapshots" / ("ab" * 20)
    folder = tmp_path / "hv7b" / "gguf"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf", "source": {"path": str(snapshot)}, "files": {
        "m-Q4_K_M.gguf": {"quant": "Q4_K_M"}, "m-Q8_0.gguf": {"quant": "Q8_0"}}}))
    opened = SimpleNamespace(text_path=folder / "m-Q4_K_M.gguf")
    assert model_name(SimpleNamespace(path=folder, backend="gguf", engine=opened)) == "HuatuoGPT-Vision-7B-Q4_K_M"
    (folder / "manifest.json").write_text(json.dumps({"format": "onnx", "source": {"path": "/x/checkpoint"},
                                                      "onnx": {"quant": "int4"}}))
    assert model_name(SimpleNamespace(path=folder, backend="onnx", engine=None)) == "hv7b-int4"
    (folder / "manifest.json").write_text(json.dumps({"format": "onnx", "name": "HuatuoGPT-Vision-34B",
                                                      "onnx": {"quant": "int8"}}))
    assert model_name(SimpleNamespace(path=folder, backend="onnx", engine=None)) == "HuatuoGPT-Vision-34B-int8"
    if DEMO.is_dir():
        for backend in ("gguf", "onnx"):
            with api.load(DEMO.parent / backend, backend=backend, threads=1) as demo:
                assert model_name(demo) == {"gguf": "huatuo-lite-demo-Q8_0", "onnx": "huatuo-lite-demo-int8"}[backend]
