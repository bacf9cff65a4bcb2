"""The run report in a real browser (Debian's headless Chromium): the page renders, every image decodes,
the metrics table holds the run's numbers; and `odmt report` for a run with no served answers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.tiny_run import tiny_run


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed, so the report cannot be checked in a real browser. `make setup` "
                    "installs Debian's `chromium` where apt is available; else run `apt-get install -y chromium`.")
    return path


def browse(page: Path, profile: Path, screenshot: Path | None = None) -> str:
    """Opens `page` headless in a fresh profile; returns the DOM after its scripts ran (and takes a screenshot)."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
             "--mute-audio", f"--user-data-dir={profile}", "--window-size=1280,2400"]
    if screenshot is not None:
        done = subprocess.run([*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and screenshot.is_file(), done.stderr[-2000:]
    done = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def body_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, "no <body> in the rendered page"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag.group(1)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def rendered(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    shot = folder / "report.png"
    dom = browse(tiny.work / "report.html", folder / "profile", shot)
    return dom, shot


def test_page_renders_in_chromium(rendered):
    dom, shot = rendered
    assert body_attrs(dom)["data-rendered"] == "yes"  # the page's own script ran after load
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        grey = im.convert("L")
        assert grey.getextrema()[0] < 60  # text and figures drew dark pixels, not a blank page
        assert sum(grey.histogram()[:200]) > 0.02 * im.size[0] * im.size[1]


def test_every_image_loads(rendered, tiny):
    dom, _ = rendered
    attrs = body_attrs(dom)
    served = json.loads((tiny.work / "served.json").read_text())
    shown = {i for s in served["sessions"] for i in [*s["history"][-8:], s["target"], *(a[0] for a in s["answers"])]}
    assert int(attrs["data-images"]) >= len(shown) + 4  # item thumbnails and the four figures
    assert attrs["data-broken-images"] == "0"


def test_metrics_table_holds_the_runs_numbers(rendered, tiny):
    dom, _ = rendered
    table = re.search(r'<table id="test-metrics">.*?</table>', dom, re.S).group(0)
    for model in ("odmt", "sasrec"):
        m = json.loads((tiny.work / "runs" / model / "metrics-test.json").read_text())
        for metric in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "coverage@10"):
            cell = re.search(rf'<td data-model="{model}" data-metric="{re.escape(metric)}" data-value="([^"]*)">([^<]*)</td>',
                             table)
            assert cell, f"no {model} {metric} cell"
            assert float(cell.group(1)) == m[metric] and cell.group(2) == f"{m[metric]:.4f}"
    assert dom.count('data-served="true"') == len(json.loads((tiny.work / "served.json").read_text())["sessions"])


def test_each_served_answer_names_the_branch_that_drove_it(rendered, tiny):
    dom, _ = rendered
    served = json.loads((tiny.work / "served.json").read_text())
    branches = set(json.loads((tiny.work / "runs" / "odmt" / "config.json").read_text())["model"]["modalities"])
    drivers = []
    for s in served["sessions"]:  # asked of the Triton server's optional per-branch outputs
        assert len(s["drove"]) == len(s["contributions"]) == len(s["answers"]) > 0
        for drove, lifts in zip(s["drove"], s["contributions"]):
            assert set(lifts) <= branches and drove == max(lifts, key=lifts.get)
        drivers += s["drove"]
    cards = re.findall(r'<figure class="item answer served[^"]*" data-item="[^"]*" data-drove="([^"]*)"', dom)
    assert cards == drivers
    assert "the branch that drove it" in dom


def test_a_broken_image_is_counted(tiny, tmp_path):
    page = (tiny.work / "report.html").read_text()
    broken = re.sub(r'src="data:image/png;base64,[^"]{8}', 'src="data:image/png;base64,AAAAAAAA', page, count=1)
    assert broken != page
    (tmp_path / "broken.html").write_text(broken)
    assert body_attrs(browse(tmp_path / "broken.html", tmp_path / "profile"))["data-broken-images"] == "1"


def test_report_is_self_contained(tiny):
    page = (tiny.work / "report.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing is fetched: every image is a data URI
    assert "http://" not in page and "https://" not in page


def test_odmt_report_for_a_run_without_served_answers(tiny, tmp_path, capsys):
    from odmt_t4r.cli import main

    run = tmp_path / "runs-elsewhere" / "odmt"  # outside any `odmt run` WORK: no served answers, no stage times
    shutil.copytree(tiny.work / "runs" / "odmt", run)
    out = tmp_path / "r.html"
    assert main(["report", "--run", str(run), "--baseline", str(tiny.work / "runs" / "sasrec"), "--out", str(out),
                 "--sessions", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out.resolve()}"
    page = out.read_text()
    assert page.count('data-served="false"') == 3 and "in-process, not served" in page
    assert re.findall(r'class="item answer in-process[^"]*" data-item="[^"]*" data-drove="(id|text|image)"', page)
    assert 'id="facts-stages"' not in page
    m = json.loads((run / "metrics-test.json").read_text())
    assert f'data-value="{m["NDCG@10"]!r}"' in page


def test_odmt_report_errors_name_the_folder(tmp_path, capsys):
    from odmt_t4r.cli import main

    assert main(["report", "--run", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"odmt report: error: {tmp_path} holds no finished training run (config.json, model.pt): train one with "
        "`odmt train` or `odmt run`")
