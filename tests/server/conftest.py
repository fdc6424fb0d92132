"""Servers for tests/server/: a tiny 7B torch model behind a key and an --allow-dir, and the
same model with `huatuo-lite serve`'s defaults (no key, no --allow-dir). Package-scoped: the
files of this folder share one model and two servers."""
from __future__ import annotations

import pytest

from support.server_http import EXAMPLE, KEY


@pytest.fixture(scope="package")
def model(tiny_7b):
    api = pytest.importorskip("huatuo_lite.api")
    with api.load(tiny_7b, backend="torch") as hv:
        yield hv


@pytest.fixture(scope="package")
def allowed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "scan.png").write_bytes(EXAMPLE.read_bytes())
    return folder


@pytest.fixture(scope="package")
def server(model, allowed):
    from huatuo_lite.server.policy import ServerSettings
    from huatuo_lite.server.run import background_server

    settings = ServerSettings(model_id="tiny-7b", api_key=KEY, allow_dirs=(allowed,),
                              max_body_bytes=2 * 1024 * 1024, max_messages=8)
    with background_server(model, settings) as url:
        yield url


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key=KEY, base_url=server + "/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def open_server(model):
    """No key and no --allow-dir: the defaults of `huatuo-lite serve`."""
    from huatuo_lite.server.policy import ServerSettings
    from huatuo_lite.server.run import background_server

    with background_server(model, ServerSettings(model_id="tiny-7b", allow_hosts=("scanner.lan",))) as url:
        yield url
