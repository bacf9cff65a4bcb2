"""`odmt report`: one self-contained HTML page about a finished training run.

    odmt report --run RUN [--baseline RUN2] --out FILE.html [--work WORK]

The page holds everything it shows: figures are matplotlib PNGs and item photos are PNG thumbnails, both
embedded as base64 data URIs; a Content-Security-Policy forbids any fetch, so it reads the same offline.
It shows:
  - the test metrics of the run and the baseline (and the RecBole anchors when the data is ml-100k);
  - per-branch against fused metrics, as a table and a figure;
  - training curves: each branch's loss, the distillation loss and weight, validation NDCG@10 per epoch;
  - example held-out test sessions as rows of item thumbnails with text, then the top-k: the answers of
    the Triton server when WORK/served.json exists (`odmt run`), else the model's own in-process answers
    (labelled so); the held-out next item is highlighted where it appears; each answer names the branch
    that drove it (odmt_t4r/model/explain.py), served by Triton's optional per-branch outputs or in-process;
  - run facts: data counts, settings, versions, and the time of each stage (from WORK/stages).
RUN/metrics-test.json is used when present (`odmt evaluate`); otherwise the test split is scored here.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import platform
import sys
import time
from pathlib import Path

from odmt_t4r.contract import PreparedDir, RunFolder, read_selection

REPORT_METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "longtail/NDCG@10", "coverage@10")
BRANCH_COLORS = {"id": "#1f77b4", "text": "#ff7f0e", "image": "#2ca02c", "mean": "#7f7f7f", "fused": "#000000"}
BASELINE_COLOR = "#d62728"
THUMB = 96  # longest side of an embedded item photo, pixels


def log(message: str) -> None:
    print(f"[report] {message}", file=sys.stderr, flush=True)


# -- reading a run -------------------------------------------------------------------------------------

class RunView:
    """What the report reads from a RUN folder (odmt train) and its prepared DIR."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir).resolve()
        run = RunFolder(self.dir)
        if not run.has_model():
            raise FileNotFoundError(f"{self.dir} holds no finished training run (config.json, model.pt): "
                                    "train one with `odmt train` or `odmt run`")
        self.config = run.config()
        self.name = self.config.get("model", {}).get("name") or self.dir.name
        self.data_dir = Path(self.config.get("data", {}).get("dir", ""))
        if not PreparedDir(self.data_dir).is_prepared():
            raise FileNotFoundError(f"the prepared DIR of {self.dir} ({self.data_dir}) is gone; the report needs "
                                    "its item catalog and counts")
        log_path = self.dir / "log.jsonl"
        self.log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
            if log_path.is_file() else []
        fusion = self.dir / "fusion.json"
        self.fusion = json.loads(fusion.read_text()) if fusion.is_file() else None
        self.selection = read_selection(self.dir)  # a RUN of odmt train --candidates / --model odmt-auto
        self._metrics = None

    @property
    def metrics(self) -> dict:
        if self._metrics is None:
            path = self.dir / "metrics-test.json"
            if path.is_file():
                self._metrics = json.loads(path.read_text())
            else:
                from odmt_t4r.training.evaluate import evaluate_run

                log(f"{self.dir} has no metrics-test.json: scoring its test split (not written)")
                self._metrics = evaluate_run(self.dir, self.data_dir, "test")
        return self._metrics

    @property
    def branches(self) -> list[str]:
        model = self.config.get("model", {})
        return list(model.get("modalities") or ["id"]) if model.get("fusion", "peer") == "peer" else ["late"]


# -- figures -------------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _axes(title: str, ylabel: str, size=(6.4, 3.6)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs
    return fig, ax


def _epochs(log: list[dict]) -> list[int]:
    return [r["epoch"] for r in log]


def figure_losses(run: RunView, baseline: RunView | None) -> str:
    fig, ax = _axes(f"Training loss per branch ({run.name})", "cross-entropy")
    for b in run.branches:
        ax.plot(_epochs(run.log), [r["losses"].get(b) for r in run.log], "o-", color=BRANCH_COLORS.get(b), label=b)
    if baseline is not None and baseline.log:
        ax.plot(_epochs(baseline.log), [r["losses"].get("id", r["losses"]["loss"]) for r in baseline.log], "s--",
                color=BASELINE_COLOR, label=f"{baseline.name} (baseline)")
    ax.legend(fontsize=8)
    return _png(fig)


def figure_distillation(run: RunView) -> str:
    fig, ax = _axes(f"Online distillation ({run.name})", "KD loss")
    epochs = _epochs(run.log)
    ax.plot(epochs, [r["losses"].get("kd", 0.0) for r in run.log], "o-", color="#9467bd", label="KD loss")
    twin = ax.twinx()
    twin.plot(epochs, [r.get("kd_weight", 0.0) for r in run.log], "^--", color="#8c564b", label="KD weight")
    twin.set_ylabel("KD weight")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    return _png(fig)


def figure_validation(run: RunView, baseline: RunView | None) -> str:
    fig, ax = _axes("Validation NDCG@10 per epoch", "NDCG@10")
    epochs = _epochs(run.log)
    ax.plot(epochs, [r["valid"]["NDCG@10"] for r in run.log], "o-", color=BRANCH_COLORS["fused"], linewidth=2.2,
            label=f"{run.name} fused")
    for name in ["mean", *run.branches]:
        values = [r["valid"].get(f"{name}/NDCG@10") for r in run.log]
        if any(v is not None for v in values):
            ax.plot(epochs, values, "o-", color=BRANCH_COLORS.get(name), alpha=0.8, linewidth=1.2,
                    label=f"{name}" + (" (plain mean)" if name == "mean" else " branch"))
    if baseline is not None and baseline.log:
        ax.plot(_epochs(baseline.log), [r["valid"]["NDCG@10"] for r in baseline.log], "s--", color=BASELINE_COLOR,
                label=f"{baseline.name} (baseline)")
    ax.legend(fontsize=8)
    return _png(fig)


def branch_rows(run: RunView) -> list[tuple[str, dict]]:
    """(label, {metric: value}) for the fused scorer, the plain mean and each branch on the test split."""
    m = run.metrics
    rows = [("fused", {k: m.get(k) for k in REPORT_METRICS})]
    for name in ["mean", *run.branches]:
        if f"{name}/NDCG@10" in m:
            rows.append((name, {k: m.get(f"longtail/{name}/NDCG@10") if k == "longtail/NDCG@10"
                                else m.get(f"{name}/{k}") for k in REPORT_METRICS}))
    return rows


def figure_branches(run: RunView, baseline: RunView | None) -> str:
    import numpy as np

    rows = branch_rows(run)
    if baseline is not None:
        rows.append((f"{baseline.name} (baseline)", {k: baseline.metrics.get(k) for k in REPORT_METRICS}))
    fig, ax = _axes(f"Test metrics: per branch vs fused ({run.name})", "value", size=(7.2, 3.6))
    ax.set_xlabel("")
    shown = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
    x = np.arange(len(shown))
    width = 0.8 / len(rows)
    for i, (label, values) in enumerate(rows):
        color = BRANCH_COLORS.get(label, BASELINE_COLOR)
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [values.get(k) or 0.0 for k in shown], width, label=label,
               color=color, alpha=0.85)
    ax.set_xticks(x, shown)
    ax.legend(fontsize=8, ncol=3)
    return _png(fig)


# -- items and sessions --------------------------------------------------------------------------------

class Catalog:
    """Item text and PNG thumbnails (base64) by raw item ID, from the prepared DIR's items.parquet."""

    def __init__(self, data_dir: Path):
        items = PreparedDir(data_dir).items()
        ids = items["item_id"].astype(str).tolist()
        self.text = dict(zip(ids, items["text"].fillna("").astype(str))) if "text" in items else {}
        self.paths = {}
        if "image" in items:
            for item_id, p in zip(ids, items["image"]):
                if isinstance(p, str) and p:
                    self.paths[item_id] = Path(p) if Path(p).is_absolute() else data_dir / p
        self._thumbs: dict[str, str | None] = {}

    def thumbnail(self, item_id: str) -> str | None:
        """A base64 PNG of the item's photo (at most THUMB pixels a side), None without a readable one."""
        if item_id not in self._thumbs:
            self._thumbs[item_id] = None
            path = self.paths.get(item_id)
            if path is not None:
                try:
                    from PIL import Image

                    with Image.open(path) as im:
                        im = im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode)
                        im.thumbnail((THUMB, THUMB))
                        buf = io.BytesIO()
                        im.save(buf, format="PNG")
                    self._thumbs[item_id] = base64.b64encode(buf.getvalue()).decode("ascii")
                except Exception:  # noqa: BLE001 - a missing or undecodable photo: the card shows text only
                    pass
        return self._thumbs[item_id]


def in_process_examples(run: RunView, n: int, k: int, seed: int = 0) -> dict:
    """The same held-out sessions `odmt run` serves, answered by the model in this process."""
    import torch

    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.model.explain import BranchExplainer, driving_branches
    from odmt_t4r.training.data import sample_sessions
    from odmt_t4r.trust import verify_run

    sessions = sample_sessions(run.data_dir, n, seed=seed)
    verify_run(run.dir)  # before its weights are loaded
    items = PreparedDir(run.data_dir).items(["item_idx", "item_id"])
    index = dict(zip(items["item_id"].astype(str), items["item_idx"].tolist()))
    raw = {v: k for k, v in index.items()}
    model = OdmtRecommender.from_pretrained(run.dir, data_dir=run.data_dir)
    explainer = BranchExplainer(model)
    L = model.config.max_length
    for s in sessions:  # as the server: the latest L items are read, and left out of the answers
        history = torch.tensor([[index[i] for i in s["history"][-L:]]], dtype=torch.long)
        scores, top = model.recommend(history, k=k)
        found = torch.isfinite(scores[0])
        s["answers"] = [[raw[int(i)], float(v)] for v, i in zip(scores[0][found], top[0][found])]
        lifts = {b: v[0][found].numpy() for b, v in explainer.contributions(history, top).items()}
        s["drove"] = driving_branches(lifts).tolist()
        s["contributions"] = [{b: float(v[j]) for b, v in lifts.items()} for j in range(len(s["answers"]))]
        ids = [a[0] for a in s["answers"]]
        s["target_rank"] = ids.index(s["target"]) + 1 if s["target"] in ids else None
    return {"k": k, "served": False, "max_length": L, "sessions": sessions}


def _card(item_id: str, catalog: Catalog, label: str = "", classes: str = "", drove: str = "",
          title: str = "") -> str:
    thumb = catalog.thumbnail(item_id)
    img = (f'<img src="data:image/png;base64,{thumb}" alt="{html.escape(item_id)}">' if thumb
           else '<div class="noimg">no photo</div>')
    head = f'<span class="label">{html.escape(label)}</span>' if label else ""
    extra = (f' data-drove="{html.escape(drove)}"' if drove else "") + (f' title="{html.escape(title)}"' if title else "")
    return (f'<figure class="item {classes}" data-item="{html.escape(item_id)}"{extra}>{head}{img}<figcaption>'
            f'<b>{html.escape(item_id)}</b> {html.escape(catalog.text.get(item_id, ""))}</figcaption></figure>')


def sessions_html(examples: dict, catalog: Catalog, show_history: int = 8) -> str:
    served = examples.get("served")
    source = (f'served by the Triton server (HTTP {html.escape(examples["server"]["http"])}; gRPC gave the same '
              f'answers) in one request of {examples.get("request_ms", 0):.1f} ms' if served else
              "the model's answers in this process (no Triton server was asked for this report)")
    L = examples.get("max_length", 0)
    parts = [f'<p class="note">{len(examples["sessions"])} held-out test sessions. Top-{examples["k"]}: {source}. '
             f'The model reads each session\'s latest {L} items and leaves them out of its answers; the held-out '
             'next item is outlined in green.'
             + (' Each answer names the branch that drove it (ID, text or image): the branch whose weighted score '
                'lifts the item most above an average catalog item; hover an answer for every branch\'s lift.'
                if any("drove" in s for s in examples["sessions"]) else "") + '</p>']
    for n, s in enumerate(examples["sessions"], 1):
        history = s["history"][-show_history:]
        rank = s.get("target_rank")
        if rank:
            verdict = f'the held-out next item is at rank {rank}'
        elif s["target"] in s["history"][-L:]:
            verdict = f'the held-out next item is among the session\'s latest {L} items, which the answers leave out'
        else:
            verdict = f'the held-out next item is not in the top-{examples["k"]}'

        cards = "".join(_card(i, catalog) for i in history)
        tag = "served" if served else "in-process"
        drove = s.get("drove") or [""] * len(s["answers"])  # served before explanations existed: none
        lifts = s.get("contributions") or [{}] * len(s["answers"])
        answers = "".join(
            _card(i, catalog, f"#{r} · {score:.2f}" + (f" · {d}" if d else ""),
                  f"answer {tag}" + (" hit" if i == s["target"] else ""), drove=d,
                  title=", ".join(f"{b} {v:+.2f}" for b, v in lift.items()))
            for r, ((i, score), d, lift) in enumerate(zip(s["answers"], drove, lifts), 1))
        parts.append(
            f'<section class="session" data-served="{str(bool(served)).lower()}" data-target-rank="{rank or 0}">'
            f'<h3>Session {n}: {len(s["history"])} items{" (latest " + str(len(history)) + ")" if len(history) < len(s["history"]) else ""}; {verdict}</h3>'
            f'<div class="row history">{cards}<span class="arrow" title="the held-out next item">&rarr;</span>'
            f'{_card(s["target"], catalog, "held-out next", "target")}</div>'
            f'<div class="rowlabel">top-{examples["k"]} {"served by Triton" if served else "(in-process, not served)"}</div>'
            f'<div class="row answers">{answers}</div></section>')
    return "\n".join(parts)


# -- tables --------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _metric_cells(model: str, values: dict) -> str:
    return "".join(f'<td data-model="{html.escape(model)}" data-metric="{k}" data-value="{"" if values.get(k) is None else repr(values[k])}">'
                   f'{_fmt(values.get(k))}</td>' for k in REPORT_METRICS)


def metrics_table(run: RunView, baseline: RunView | None, anchors: dict | None) -> str:
    head = "".join(f"<th>{k}</th>" for k in REPORT_METRICS)
    rows = [(run.name, "", {k: run.metrics.get(k) for k in REPORT_METRICS})]
    if baseline is not None:
        rows.append((baseline.name, "baseline", {k: baseline.metrics.get(k) for k in REPORT_METRICS}))
    for name, values in (anchors or {}).items():
        rows.append((name, "anchor: RecBole 1.2.1, same split, re-scored with this protocol, 1 seed", values))
    body = "".join(f'<tr data-model="{html.escape(name)}"><th>{html.escape(name)}'
                   f'{" <small>(" + html.escape(note) + ")</small>" if note else ""}</th>{_metric_cells(name, v)}</tr>'
                   for name, note, v in rows)
    m = run.metrics
    return (f'<table id="test-metrics"><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>'
            f'<p class="note">Test split: {m.get("n_users", 0):,} users, every catalog item ranked, each user\'s '
            f'earlier items excluded. Long tail: {m.get("longtail_users", 0):,} users whose target is a rare item '
            f'({html.escape(str(m.get("longtail_rule", "")))}). Coverage@10: the share of catalog items in some '
            f'user\'s top 10.</p>')


def branch_table(run: RunView) -> str:
    head = "".join(f"<th>{k}</th>" for k in REPORT_METRICS)
    labels = {"fused": f"fused ({(run.fusion or {}).get('name', 'mean')})", "mean": "plain mean of the branches"}
    body = "".join(f'<tr data-scorer="{name}"><th>{html.escape(labels.get(name, name + " branch"))}</th>'
                   f'{_metric_cells(name, values)}</tr>' for name, values in branch_rows(run))
    return f'<table id="branch-metrics"><thead><tr><th>scorer ({html.escape(run.name)})</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(pairs: list[tuple[str, object]], table_id: str) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv" id="{table_id}">{rows}</table>'


TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "threads")
MODEL_KEYS = ("d_model", "n_heads", "seq_layers", "imt_layers", "max_length", "loss", "kd_weight", "tau", "kd_mode",
              "id_teacher", "text_tokens", "image_tokens")


def facts_html(run: RunView, baseline: RunView | None, work: Path | None) -> str:
    manifest = PreparedDir(run.data_dir).manifest()
    c = manifest.get("counts", {})
    rows = c.get("rows", {})
    data = [("source", manifest.get("source")), ("prepared DIR", run.data_dir),
            ("users", f"{c.get('users', 0):,} ({c.get('users_evaluated', 0):,} evaluated)"),
            ("catalog items", f"{c.get('items', 0):,}"), ("interactions", f"{c.get('interactions', 0):,}"),
            ("mean sequence length", c.get("mean_sequence_length")),
            ("rows train / valid / test", " / ".join(f"{rows.get(s, 0):,}" for s in ("train", "valid", "test"))),
            ("modalities", ", ".join(manifest.get("modalities", []))), ("max history length", manifest.get("max_length"))]
    parts = ["<h3>Data</h3>", _kv_table(data, "facts-data")]
    for view, role in ((run, "model"), (baseline, "baseline")):
        if view is None:
            continue
        train, model = view.config.get("train", {}), view.config.get("model", {})
        mcfg = train.get("model_config", {}) | model
        best = max(view.log, key=lambda r: r["valid"]["NDCG@10"]) if view.log else None
        pairs = [("RUN", view.dir), ("branches", ", ".join(view.branches)),
                 ("epochs run", f"{len(view.log)}" + (f" (best valid NDCG@10 {best['valid']['NDCG@10']:.4f} at epoch "
                                                      f"{best['epoch']})" if best else "")),
                 ("training time", f"{sum(r.get('seconds', 0) for r in view.log):.0f}s")]
        if view.fusion:
            pairs.append(("fusion (chosen on validation)", view.fusion.get("name")))
        if view.selection and view.selection.get("chosen"):
            pairs.append(("model (chosen on validation)", f"{view.selection['chosen']} of " + ", ".join(
                f"{name} {score:.4f}" for name, score in view.selection["candidates"].items()) + " (valid NDCG@10)"))
        pairs += [(k, train[k]) for k in TRAIN_KEYS if k in train]
        pairs += [(k, mcfg[k]) for k in MODEL_KEYS if k in mcfg and (k not in ("kd_weight", "tau", "kd_mode", "id_teacher")
                                                                      or len(view.branches) > 1)]
        parts += [f"<h3>{html.escape(view.name)} ({role})</h3>", _kv_table(pairs, f"facts-{role}")]
    stages = []
    for path in sorted((work / "stages").glob("*.json")) if work else []:
        rec = json.loads(path.read_text())
        if rec.get("status") == "done":
            stages.append((rec.get("finished", ""), rec["stage"], rec.get("seconds", 0.0)))
    if stages:
        order = {"prepare": 0, "train": 1, "evaluate": 2, "export": 3, "serve": 4, "report": 5}
        stages.sort(key=lambda s: (order.get(s[1].split("-")[0], 9), s[0]))
        pairs = [(name, f"{seconds:.1f}s (finished {finished})") for finished, name, seconds in stages]
        parts += ["<h3>Stages (odmt run)</h3>", _kv_table(pairs, "facts-stages")]
    import matplotlib
    import torch

    versions = dict(manifest.get("versions", {}))
    versions.update({"python": platform.python_version(), "torch": torch.__version__,
                     "matplotlib": matplotlib.__version__})
    parts += ["<h3>Versions</h3>", _kv_table(sorted(versions.items()), "facts-versions")]
    return "\n".join(parts)


# -- the page ------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1240px;color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#555;margin-top:0} .note{color:#555;font-size:13px}
table{border-collapse:collapse;margin:8px 0;font-size:14px} th,td{border:1px solid #ddd;padding:4px 8px}
thead th{background:#f4f4f4} td{text-align:right;font-variant-numeric:tabular-nums} tbody th{text-align:left;font-weight:600}
table.kv td{text-align:left} small{font-weight:normal;color:#666}
.figs{display:flex;flex-wrap:wrap;gap:12px} .figs figure{margin:0} .figs img{max-width:600px;border:1px solid #eee}
.session{border:1px solid #e3e3e3;border-radius:6px;padding:8px 12px;margin:14px 0}
.session h3{margin:4px 0 8px;font-size:15px}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin-bottom:8px}
.arrow{font-size:28px;color:#2ca02c;align-self:center;margin:0 2px}
.rowlabel{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em;align-self:center;margin-right:4px}
figure.item{margin:0;width:98px;font-size:11px;border:2px solid transparent;border-radius:4px;padding:3px;background:#fafafa}
figure.item img{width:56px;height:56px;image-rendering:pixelated;display:block;margin:0 auto 3px;background:#000}
figure.item .noimg{width:56px;height:56px;margin:0 auto 3px;background:#eee;color:#999;font-size:10px;
  display:flex;align-items:center;justify-content:center}
figure.item figcaption{line-height:1.25;max-height:5.1em;overflow:hidden}
figure.item .label{display:block;font-weight:600;font-size:11px;color:#444}
figure.target{border-color:#2ca02c} figure.hit{border-color:#2ca02c;background:#e9f7e9}
"""

SCRIPT = """
(function () {
  function count() {  // images that did not decode: a test reads these attributes from the rendered page
    var imgs = document.images, bad = 0;
    for (var i = 0; i < imgs.length; i++) { if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad++; }
    document.body.setAttribute('data-images', String(imgs.length));
    document.body.setAttribute('data-broken-images', String(bad));
    document.body.setAttribute('data-rendered', 'yes');
  }
  if (document.readyState === 'complete') count(); else window.addEventListener('load', count);
})();
"""


def render(run: RunView, baseline: RunView | None, examples: dict, work: Path | None) -> str:
    from odmt_t4r.anchors import RECBOLE_ML100K

    source = PreparedDir(run.data_dir).manifest().get("source")
    anchors = RECBOLE_ML100K if source == "ml-100k" else None
    catalog = Catalog(run.data_dir)
    figures = [("losses", figure_losses(run, baseline), "Each branch's training cross-entropy per epoch."),
               ("validation", figure_validation(run, baseline), "Validation NDCG@10 after each epoch: the fused "
                "score the model keeps, the plain mean, each branch alone, and the baseline.")]
    if len(run.branches) > 1:
        figures.insert(1, ("distillation", figure_distillation(run), "The peer-distillation loss and its ramped weight."))
    figs = "".join(f'<figure id="fig-{name}"><img src="data:image/png;base64,{png}" alt="{name}">'
                   f'<figcaption class="note">{html.escape(caption)}</figcaption></figure>' for name, png, caption in figures)
    m, b = run.metrics, (baseline.metrics if baseline else None)
    headline = f"test NDCG@10 {m['NDCG@10']:.4f} ({run.name})"
    if b:
        ratio = f", {m['NDCG@10'] / b['NDCG@10']:.2f}x" if b["NDCG@10"] else ""
        headline += f" vs {b['NDCG@10']:.4f} ({baseline.name}{ratio})"
    title = f"odmt run report: {run.name} on {source}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body data-rendered="no">
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(headline)}. Built {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {html.escape(str(run.dir))}.</p>
<h2 id="metrics">Test metrics</h2>
{metrics_table(run, baseline, anchors)}
<h2 id="branches">Per branch vs fused</h2>
{branch_table(run)}
<div class="figs"><figure id="fig-branches"><img src="data:image/png;base64,{figure_branches(run, baseline)}" alt="branches">
<figcaption class="note">Test HR and NDCG of each branch alone, their plain mean, the fusion chosen on validation, and the baseline.</figcaption></figure></div>
<h2 id="training">Training</h2>
<div class="figs">{figs}</div>
<h2 id="examples">Example sessions</h2>
{sessions_html(examples, catalog)}
<h2 id="facts">Run facts</h2>
{facts_html(run, baseline, work)}
<script>{SCRIPT}</script>
</body></html>
"""


def find_work(run_dir: Path) -> Path | None:
    """WORK of `odmt run` when RUN is its WORK/runs/<model>."""
    work = run_dir.resolve().parent.parent
    return work if run_dir.resolve().parent.name == "runs" and (work / "stages").is_dir() else None


def build_report(run: str | Path, out: str | Path, baseline: str | Path | None = None, work: str | Path | None = None,
                 sessions: int = 4, k: int = 10) -> Path:
    """Writes the report of RUN (against `baseline`) to `out`; returns its path. Served answers and stage
    times come from `work` (default: the `odmt run` folder RUN lives in, if any)."""
    from odmt_t4r.output_folder import atomic_write

    view = RunView(run)
    base = RunView(baseline) if baseline else None
    work = Path(work).resolve() if work else find_work(view.dir)
    served = work / "served.json" if work else None
    if served is not None and served.is_file():
        examples = json.loads(served.read_text())
    else:
        examples = in_process_examples(view, sessions, k)
    page = render(view, base, examples, work)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, page, fsync=False)
    return out.resolve()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a finished RUN (odmt train)")
    p.add_argument("--baseline", default=None, help="a second RUN to compare with (e.g. the sasrec run)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--work", default=None, help="an `odmt run` WORK folder: its served answers and stage times "
                                                "(default: the one RUN lives in, if any)")
    p.add_argument("--sessions", type=int, default=4, help="example sessions when no served answers exist")
    p.add_argument("--k", type=int, default=10)


def run(args: argparse.Namespace) -> int:
    if args.sessions < 1 or args.k < 1:
        raise ValueError("--sessions and --k must be at least 1")
    path = build_report(args.run, args.out, baseline=args.baseline, work=args.work, sessions=args.sessions, k=args.k)
    print(f"wrote {path}")
    return 0
