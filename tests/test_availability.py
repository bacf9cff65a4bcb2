"""Live availability (`odmt availability`): which items a live repository may serve, changed on a REAL running
`odmt serve` without a restart and without reloading the model.

From the moment the command returns, no answer holds an unavailable item; the served answers equal the
in-process answers with those items excluded, also combined with a request's own rules; requests under load
never fail while the state changes; an ID the served version does not hold is refused and the old state stays.
The store and the RUN are tests/test_serving.py's."""

import json
import shutil
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from tests.test_add_items import _serve
from tests.test_business_rules import in_process  # noqa: F401
from tests.test_serving import K, data_dir, known, run_dir, sessions  # noqa: F401
from tests.triton_fixtures import triton_available
from triton_models.availability import AVAILABILITY, read_availability, set_availability
from triton_models.client import RecommenderClient
from triton_models.export import ServingConfig, export

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not triton_available(), reason="no tritonserver")]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def exported(run_dir, data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("availability") / "repo"
    export(run_dir, out, ServingConfig(k=K), data_dir=data_dir, check_sessions=5, log=quiet)
    return out


@pytest.fixture
def repo(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "repo")


def ids_csv(path, ids):
    pd.DataFrame({"item_id": ids}).to_csv(path, index=False)
    return path


def odmt(*args):
    return subprocess.run([sys.executable, "-m", "odmt_t4r.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_the_state_is_recorded_in_the_checked_manifest_and_changes_as_asked(repo, known):  # noqa: F811
    from triton_models.repository import checked_repository

    first = set_availability(repo, unavailable=known[:5], log=quiet)
    assert first["unavailable"] == 5 and first["sequence"] == 1
    assert read_availability(repo)["unavailable"] == sorted(known[:5])
    manifest = checked_repository(repo)  # the full check `odmt serve` runs: the file is recorded
    assert AVAILABILITY in manifest["files"]
    set_availability(repo, available=known[:2], log=quiet)
    assert read_availability(repo)["unavailable"] == sorted(known[2:5])
    set_availability(repo, unavailable=known[7:9], replace=True, log=quiet)
    assert read_availability(repo)["unavailable"] == sorted(known[7:9])
    shown = odmt("availability", "--repo", repo, "--show")
    assert shown.returncode == 0 and json.loads(shown.stdout)["unavailable_count"] == 2


@pytest.mark.parametrize("rows, message", [
    (lambda known: ["__no-such-item__", known[0]], "1 of the 2 IDs are not served"),
    (None, "has no item_id column"),
])
def test_bad_files_are_refused_with_one_line_and_the_state_stays(repo, known, tmp_path, rows, message):  # noqa: F811
    set_availability(repo, unavailable=known[:3], log=quiet)
    before = {p: (repo / p).read_bytes() for p in (AVAILABILITY, "manifest.json")}
    path = tmp_path / "ids.csv"
    if rows is None:
        pd.DataFrame({"sku": known[:2]}).to_csv(path, index=False)
    else:
        ids_csv(path, rows(known))
    done = odmt("availability", "--repo", repo, "--unavailable", path)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("odmt availability: error:") and message in last
    assert {p: (repo / p).read_bytes() for p in before} == before


def test_a_repository_whose_executor_cannot_read_it_is_refused(repo, known):  # noqa: F811
    from odmt_t4r.output_folder import read_manifest
    from odmt_t4r.trust import write_manifest

    manifest = read_manifest(repo)
    manifest.pop("capabilities")  # as `odmt export` wrote it before availability
    write_manifest(repo, {k: v for k, v in manifest.items() if k not in ("files", "signature")})
    with pytest.raises(ValueError, match="does not read an availability file"):
        set_availability(repo, unavailable=known[:1], log=quiet)
    assert not (repo / AVAILABILITY).exists()


def test_a_running_server_applies_it_from_the_next_request_without_a_reload_under_load(repo, sessions, known,  # noqa: F811
                                                                                       in_process, tmp_path):  # noqa: F811
    log = tmp_path / "serve.log"
    proc, url = _serve(repo, log)
    few = sessions[:12]
    stop, failures, late, answered, in_window = threading.Event(), [], [], [0], [0]
    hidden: set[str] = set()
    window = [float("inf"), float("inf")]  # from the change's acknowledgement to the start of its undoing

    def load():  # clients sending continuously while the availability changes
        client = RecommenderClient(url, protocol="http")
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answers = client.recommend(few[:3])
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
                continue
            if window[0] < sent and time.monotonic() < window[1]:
                in_window[0] += 1
                if hidden & {i for a in answers for i, _ in a}:
                    late.append(answers)

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        with RecommenderClient(url, protocol="http") as client:
            before = client.recommend(few)
            hidden.update(i for a in before for i, _ in a[:3])  # items these sessions are shown first
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while answered[0] < 6 and time.monotonic() < deadline:
                time.sleep(0.2)
            done = odmt("availability", "--repo", repo, "--unavailable", ids_csv(tmp_path / "out.csv", sorted(hidden)))
            window[0] = time.monotonic()
            assert done.returncode == 0, done.stderr
            after = client.recommend(few)
            assert not hidden & {i for a in after for i, _ in a}
            want_ids, want_scores = in_process(few, {"exclude_ids": sorted(hidden)})
            assert [[i for i, _ in a] for a in after] == [[w for w in row if w] for row in want_ids]
            # combined with a request's own rules and the session's own items
            extra = [i for i in known[:40] if i not in hidden][:10]
            combined = client.recommend(few, exclude=extra)
            want, _ = in_process(few, {"exclude_ids": sorted(hidden) + extra})
            assert [[i for i, _ in a] for a in combined] == [[w for w in row if w] for row in want]
            time.sleep(1.5)  # the loaders keep asking after the change
            checked = answered[0]
            window[1] = time.monotonic()
            back = odmt("availability", "--repo", repo, "--available", tmp_path / "out.csv")
            assert back.returncode == 0, back.stderr
            again = client.recommend(few)
            assert [[i for i, _ in a] for a in again] == [[i for i, _ in a] for a in before]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        proc.terminate()
        proc.wait(timeout=60)
    assert failures == [], failures[:3]
    assert late == [], "an unavailable item was answered after the change was acknowledged"
    assert in_window[0] > 0 and answered[0] > checked  # the loaders were checked after the change, and went on
    assert "now serving version" not in log.read_text()  # the model was never reloaded
