"""A real Triton server on a toy model repository, once per test session.

The toy `executor_model` (python backend) speaks the recommender wire contract of
`triton_models.client`: per session it returns the session's items reversed, padded with
`PAD_IDS`, cut to `TOY_K`, with scores 1.0, 0.9, 0.8, ...
"""

from __future__ import annotations

import contextlib
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

TOY_K = 5
PAD_IDS = [f"pad{i}" for i in range(TOY_K)]

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "item_id-list__values" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "item_id-list__offsets" data_type: TYPE_INT32 dims: [ -1 ] }}
]
output [
  {{ name: "item_ids" data_type: TYPE_STRING dims: [ -1, {k} ] }},
  {{ name: "scores" data_type: TYPE_FP32 dims: [ -1, {k} ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

TOY_MODEL = textwrap.dedent("""\
    import time
    import numpy as np
    import triton_python_backend_utils as pb_utils

    K = {k}
    PAD = [p.encode() for p in {pad!r}]


    def top_k(session):
        ids = (list(reversed(session)) + PAD)[:K]
        return ids, [1.0 - 0.1 * j for j in range(K)]


    class TritonPythonModel:
        def initialize(self, args):
            {init}

        def execute(self, requests):
            return [self._one(r) for r in requests]

        def _one(self, request):
            values = pb_utils.get_input_tensor_by_name(request, "item_id-list__values").as_numpy()
            offsets = pb_utils.get_input_tensor_by_name(request, "item_id-list__offsets").as_numpy()
            if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(values) or np.any(np.diff(offsets) < 0):
                return pb_utils.InferenceResponse(error=pb_utils.TritonError("bad offsets for the values"))
            rows = [top_k(list(values[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
            ids = np.array([r[0] for r in rows], dtype=np.object_).reshape(len(rows), K)
            scores = np.array([r[1] for r in rows], dtype=np.float32).reshape(len(rows), K)
            return pb_utils.InferenceResponse([pb_utils.Tensor("item_ids", ids), pb_utils.Tensor("scores", scores)])
    """)


def expected(session: list[str], k: int = TOY_K) -> list[tuple[str, float]]:
    ids = (list(reversed(session)) + PAD_IDS)[:TOY_K]
    return [(i, 1.0 - 0.1 * j) for j, i in enumerate(ids)][:k]


def write_toy_repo(root: Path, init: str = "pass", name: str = "executor_model") -> Path:
    """A model repository with one toy model; `init` is the body of its initialize(). Its manifest
    records every file, as `odmt export` does, so `odmt serve` accepts it."""
    from odmt_t4r.trust import write_manifest
    from triton_models.export import FORMAT

    model = Path(root) / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(CONFIG.format(name=name, k=TOY_K))
    (model / "1" / "model.py").write_text(TOY_MODEL.format(k=TOY_K, pad=PAD_IDS, init=init))
    write_manifest(root, {"format": FORMAT, "toy": True})
    return Path(root)


def triton_available() -> bool:
    from triton_models._tritonenv import find_triton

    try:
        find_triton()
        return True
    except (FileNotFoundError, OSError):
        return False


@pytest.fixture(scope="session")
def toy_repo(tmp_path_factory) -> Path:
    return write_toy_repo(tmp_path_factory.mktemp("toy_repo"))


@pytest.fixture(scope="session")
def triton_server(toy_repo, tmp_path_factory):
    """A running `TritonServer` on the toy repository (HTTP and gRPC on free loopback ports)."""
    if not triton_available():
        pytest.skip("no tritonserver (nvidia-pytriton not installed, no Triton container)")
    from triton_models.server import TritonServer

    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    with TritonServer(toy_repo, log_file=log) as server:
        yield server


@contextlib.contextmanager
def under_load(url: str, request, clients: int = 2):
    """`clients` threads calling `request(RecommenderClient)` in a loop until the block ends; yields the tally
    (`answered`, `failures`: every exception, repr) once each client was answered about twice."""
    from triton_models.client import RecommenderClient

    tally, stop = SimpleNamespace(answered=0, failures=[]), threading.Event()

    def loop():
        client = RecommenderClient(url, protocol="http")
        while not stop.is_set():
            try:
                request(client)
                tally.answered += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                tally.failures.append(repr(exc))

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120  # a busy machine answers the first requests slowly
        while tally.answered < 2 * clients and time.monotonic() < deadline:
            time.sleep(0.2)
        yield tally
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def executor_module_under(monkeypatch, pb_utils):
    """triton_models.executor_model imported afresh with `pb_utils` as triton_python_backend_utils (it binds the
    module at import). Both the sys.modules entry and the package attribute go: `from triton_models import
    executor_model` would otherwise return a copy an earlier test imported under another pb_utils."""
    import importlib
    import sys

    import triton_models

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.delitem(sys.modules, "triton_models.executor_model", raising=False)
    monkeypatch.delattr(triton_models, "executor_model", raising=False)
    return importlib.import_module("triton_models.executor_model")
