"""Quality benchmark: sasrec, late-fusion, odmt, its ablations and the variants tried while choosing its
defaults (VARIANTS), on ml-100k and the fashion default; test split, full ranking with the user's earlier
items excluded, plus the long-tail slice, coverage@10 and the validation score every choice was made on.

    .venv/bin/python benchmarks/quality.py [--datasets ml-100k fashion] [--models ...] [--seeds 0 1 2]
                                           [--epochs N | DATASET=N ...] [--patience P] [--jobs 2]
                                           [--work benchmarks/work] [--report-only]

Datasets: a source prepared with `odmt prepare`'s defaults (ml-100k, fashion), "SOURCE-L<N>" (histories
of N items), or "sparse-text" (about 9,000 items, 700 users, text only: a robustness check of the defaults
on a sparse catalog).

Each (dataset, entry, seed) trains into WORK/runs/<dataset>/; a run is found by what it trains (the
preset's settings applied, how it is executed left out), so entries that train the same thing share runs,
a finished run is reused and an unfinished one resumed: an interrupted benchmark continues where it
stopped. `--jobs N` trains N runs at once, one torch thread each. Every entry gets the same budget: the
TrainConfig defaults (an epoch ceiling; early stopping ends runs). Writes benchmarks/results/quality.json
(every run, mean/std per dataset and entry, the goals) and prints markdown tables with the RecBole
anchors and the goals.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

RESULTS = Path(__file__).parent / "results" / "quality.json"
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
# the long-tail slice (targets with at most the catalog's median train count), coverage, the valid score
TABLE_EXTRA = ("longtail/NDCG@10", "coverage@10", "valid/NDCG@10")
# odmt-auto is trained as `odmt train --model odmt-auto` trains it (successive halving, selection.py), its
# candidates one after another so that its wall time is one thread's, like every other run's
MODELS = ("sasrec", "late-fusion", "odmt", "odmt-imt", "odmt-auto")
# Variants of the odmt preset tried while choosing its defaults: name -> OdmtConfig overrides.
KD_ON = dict(kd_weight=0.5, kd_ramp=0.1, tau=0.4, kd_mask_seen=True)  # the distillation variants share these
VARIANTS = {
    "odmt-kd": dict(KD_ON, kd_mode="detached", id_teacher="none"),
    "odmt-paper-kd": dict(kd_mode="mutual", id_teacher="ensemble", kd_weight=1.0, tau=0.3, kd_ramp=0.65),
    "odmt-mutual": dict(KD_ON, kd_mode="mutual", id_teacher="ensemble"),
    "odmt-kd-ensemble": dict(KD_ON, kd_mode="detached", id_teacher="ensemble"),
    "odmt-no-kd-mask": dict(KD_ON, kd_mode="detached", id_teacher="none", kd_mask_seen=False),
    "odmt-no-prior": dict(popularity_prior=False),
    "odmt-full": dict(loss="full"),
    "odmt-in-batch": dict(loss="in_batch"),
    # the sequence encoder's dropout (RecBole's SASRec uses 0.5), for odmt and for the baseline alike
    "odmt-drop5": dict(seq_dropout=0.5),
    "sasrec-drop5": dict(preset="sasrec", seq_dropout=0.5),
    "odmt-drop1": dict(seq_dropout=0.1),
    "sasrec-drop1": dict(preset="sasrec", seq_dropout=0.1),
    # weights averaged over about 2 epochs of steps (TrainConfig.average_epochs)
    "odmt-avg2": dict(average_epochs=2.0),
    "sasrec-avg2": dict(preset="sasrec", average_epochs=2.0),
    # the raw and the averaged weights both scored each epoch, the better kept (TrainConfig.average_select)
    "odmt-avgsel": dict(average_epochs=2.0, average_select=True),
    # the cheaper item tower affords a wider model
    "odmt-d128": dict(d_model=128),
    # early-stopping patience 8 (default 5), for odmt and for the baseline alike
    "odmt-p8": dict(patience=8),
    "sasrec-p8": dict(preset="sasrec", patience=8),
    # early stopping on the fused score alone (TrainConfig.stop_on; the default "any" also waits for a branch)
    "odmt-stop-fused": dict(stop_on="fused"),
}
# Model selections (`odmt train --candidates`): name -> candidate entries that differ only in their preset.
# Composed from the candidates' runs by the rule train uses (selection.choose on the final fused valid
# NDCG@10), since `--candidates` trains each candidate exactly as it trains alone.
SELECTIONS = {
    "odmt-select": ("odmt", "odmt-imt"),  # both trained to the end: the exhaustive choice
}
# `odmt train --model NAME` by successive halving (selection.py), composed from its candidates' full runs: a
# paused and resumed run is the run trained straight through (tests/test_model_selection.py), so the choice
# at the rung is read from their log.jsonl, the wall time is the winner's plus the loser's first rung of
# epochs, and the exhaustive choice (both to the end) is reported beside it
HALVING = {"odmt-halving": ("odmt", "odmt-imt")}  # checks odmt-auto against its candidates' full runs
from odmt_t4r.anchors import RECBOLE_ML100K  # noqa: E402  (RecBole 1.2.1, same split, re-scored)


# a dataset is a source prepared with `odmt prepare`'s defaults, or "SOURCE-L<N>": the same source with
# histories of N items (--max-length N; RecBole's anchors use 50), to choose the history length on validation
DATASET_FORM = re.compile(r"^(?P<source>.+?)(?:-L(?P<max_length>\d+))?$")


def source_of(dataset: str) -> str:
    return DATASET_FORM.match(dataset)["source"]


# "sparse-text": a sparse, text-only store like an independent check's (about 9,000 items,
# 700 users, no photos), drawn by the fashion generator and prepared through the CSV path users take
SPARSE_TEXT = dict(n_items=9000, n_users=700, seed=7, mean_session_len=30.0, max_session_len=120)


def _prepare_sparse_text(out: Path) -> None:
    from odmt_t4r.data.fashion import FashionConfig, generate_fashion
    from odmt_t4r.prepare import PrepareConfig, prepare
    raw_dir = out.parent / f"{out.name}-raw"
    raw = generate_fashion(FashionConfig(**SPARSE_TEXT), raw_dir / "images")
    raw.interactions.to_csv(raw_dir / "interactions.csv", index=False)
    raw.items[["item_id", "text"]].to_csv(raw_dir / "items.csv", index=False)  # text only
    prepare(PrepareConfig(source="csv", interactions=str(raw_dir / "interactions.csv"),
                          items=str(raw_dir / "items.csv"), out=str(out)))


def prepared(dataset: str, work: Path) -> Path:
    from odmt_t4r.prepare import PrepareConfig, prepare
    out = work / "data" / dataset
    if dataset == "sparse-text" and not (out / "manifest.json").is_file():
        _prepare_sparse_text(out)
    if not (out / "manifest.json").is_file():
        form = DATASET_FORM.match(dataset)
        extra = {"max_length": int(form["max_length"])} if form["max_length"] else {}
        prepare(PrepareConfig(source=form["source"], out=str(out), **extra))
    return out


EXECUTION_ONLY = ("progress", "threads", "epochs", "nproc", "amp", "device", "candidate_jobs")
SELECTION_SETTINGS = {"candidate_jobs": 1}  # a named selection's candidates one after another, one thread
# settings added after runs were benchmarked, or removed since: at these values they train what those runs trained
NEUTRAL = {"average_epochs": 0.0, "average_select": False, "item_to_item": 0.0, "candidates": None, "lr_plateau": 0,
           "lr_decay": 0.3, "selection_rung": 5, "stop_on": "fused"}


def train_settings(model: str, seed: int, epochs: int | None, patience: int | None) -> dict:
    """The training settings of a benchmark entry, as its RUN records them: a preset, a named selection, or a
    named variant of the odmt preset."""
    from odmt_t4r.training.selection import recorded_settings, resolve

    variant = dict(VARIANTS.get(model, {}))
    preset = variant.pop("preset", model if model in MODELS else "odmt")  # a variant names its preset, else odmt
    settings = dict(model=preset, seed=seed, progress=False, threads=1, **variant)
    if preset == "odmt-auto":
        settings.update(SELECTION_SETTINGS)  # how it runs, not what it trains
    if epochs is not None:
        settings["epochs"] = epochs
    if patience is not None:
        settings["patience"] = patience
    return recorded_settings(*resolve(settings))


def effective_key(train: dict) -> str:
    """What a run trains, whatever its entry is called: the TrainConfig with the preset's defining settings
    applied and how it is executed left out. Two entries that train the same thing share their runs (so
    when a default changes to equal a variant, that variant's runs are the default's)."""
    import hashlib

    from odmt_t4r.model import model_registry

    def meaningful(d: dict, skip: tuple) -> dict:
        return {k: v for k, v in d.items() if k not in skip and not (k in NEUTRAL and v == NEUTRAL[k])}

    cfg = meaningful(train, (*EXECUTION_ONLY, "extra", "model"))
    model = meaningful({**cfg.pop("model_config"), **model_registry.get(train["model"], {})}, ("name",))
    return hashlib.sha256(json.dumps({**cfg, "model_config": model}, sort_keys=True).encode()).hexdigest()[:10]


def run_dir(work: Path, dataset: str, model: str, seed: int, epochs: int | None = None,
            patience: int | None = None) -> Path:
    """The RUN of an entry: an existing run of the same dataset and seed that trains the same thing, else
    a new folder named by the entry and its key."""
    key = effective_key(train_settings(model, seed, epochs, patience))
    folder = work / "runs" / dataset
    for run in sorted(folder.glob(f"*-s{seed}")):
        try:
            train = json.loads((run / "config.json").read_text())["train"]
        except (OSError, ValueError, KeyError):
            continue
        if effective_key(train) == key:
            return run
    return folder / f"{model}-{key}-s{seed}"


def benchmark_record(run: Path) -> dict | None:
    """The benchmark's record of a finished run (RUN/metrics-test.json with the fields one_run adds); None
    when there is none, or when `odmt evaluate --split test` wrote that file since: the run is scored again
    (its training resumes to the end at once)."""
    try:
        record = json.loads((run / "metrics-test.json").read_text())
    except (OSError, ValueError):
        return None
    return record if {"dataset", "seed", "train_seconds"} <= set(record) else None


def one_run(dataset: str, model: str, seed: int, data: Path, work: Path, epochs: int | None,
            patience: int | None) -> dict:
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import evaluate_model
    from odmt_t4r.training.selection import train_model

    settings = train_settings(model, seed, epochs, patience)
    epochs = settings["epochs"]
    run = run_dir(work, dataset, model, seed, epochs, patience)
    done = run / "metrics-test.json"
    finished = benchmark_record(run)
    if finished is not None:
        if finished.get("stopped_early") or finished.get("epochs_run", epochs) >= epochs:
            return {**finished, "model": model}
        done.unlink()  # it ran fewer epochs than this budget and had not stopped early: continue it
    # resume: an interrupted run continues, one killed before its first checkpoint starts again
    summary = train_model(settings, data, run, resume=True, epochs=epochs,
                        log=lambda m: print(f"  [{dataset} {model} s{seed}] {m}", flush=True))
    metrics = evaluate_model(OdmtRecommender.from_pretrained(run, data_dir=data), PreparedData(data), "test")
    valid = evaluate_model(OdmtRecommender.from_pretrained(run, data_dir=data), PreparedData(data), "valid")
    metrics.update(dataset=dataset, model=model, seed=seed, best_epoch=summary["best_epoch"],
                   epochs_run=summary["epochs_run"], stopped_early=summary["stopped"], epochs_cap=epochs,
                   patience=settings["patience"], train_seconds=_logged_seconds(run), run=str(run),
                   fusion=summary["fusion"]["name"], overrides=VARIANTS.get(model, {}),
                   valid={k: v for k, v in valid.items() if isinstance(v, float)},
                   **{k: summary[k] for k in ("chosen", "candidates") if k in summary})
    done.write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def trained(models: list[str]) -> list[str]:
    """The entries to train: the plain ones asked for and every candidate of a selection asked for."""
    out = []
    for m in models:
        for entry in SELECTIONS.get(m, HALVING.get(m, (m,))):
            if entry not in out:
                out.append(entry)
    return out


def composed_selections(runs: list[dict], models: list[str]) -> list[dict]:
    """A row per (dataset, selection, seed) whose candidates all finished: the candidate `odmt train
    --candidates` would keep (best final fused valid NDCG@10, from its fusion.json), training time summed."""
    from odmt_t4r.training.selection import choose

    by_key = {(r["dataset"], r["model"], r["seed"]): r for r in runs}
    out = []
    for sel in (m for m in models if m in SELECTIONS):
        for ds, seed in sorted({(r["dataset"], r["seed"]) for r in runs}):
            rows = [by_key.get((ds, c, seed)) for c in SELECTIONS[sel]]
            if None in rows:
                continue
            scores = {c: json.loads((Path(r["run"]) / "fusion.json").read_text())["valid_NDCG@10"]
                      for c, r in zip(SELECTIONS[sel], rows)}
            chosen = choose(scores)
            out.append({**by_key[(ds, chosen, seed)], "model": sel, "chosen": chosen, "candidates": scores,
                        "train_seconds": round(sum(r["train_seconds"] for r in rows), 1)})
    return out


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def composed_halving(runs: list[dict], models: list[str]) -> list[dict]:
    """A row per (dataset, named selection, seed) whose candidates all finished: what successive halving
    keeps (the rung's score: the best fused valid NDCG@10 of the first `selection_rung` epochs, ties to the
    first listed), its wall time, and whether the exhaustive choice (final fusion scores) agrees."""
    from odmt_t4r.training.selection import SelectionConfig, choose

    by_key = {(r["dataset"], r["model"], r["seed"]): r for r in runs}
    out = []
    for sel in (m for m in models if m in HALVING):
        rung = SelectionConfig(candidates=list(HALVING[sel])).selection_rung
        for ds, seed in sorted({(r["dataset"], r["seed"]) for r in runs}):
            rows = [by_key.get((ds, c, seed)) for c in HALVING[sel]]
            if None in rows:
                continue
            logs = {c: _epochs(Path(r["run"])) for c, r in zip(HALVING[sel], rows)}
            at_rung = {c: max(e["valid"]["NDCG@10"] for e in log[:rung]) for c, log in logs.items()}
            kept = choose(at_rung)
            final = {c: json.loads((Path(r["run"]) / "fusion.json").read_text())["valid_NDCG@10"]
                     for c, r in zip(HALVING[sel], rows)}
            seconds = sum(e["seconds"] for c, log in logs.items() for e in (log if c == kept else log[:rung]))
            out.append({**by_key[(ds, kept, seed)], "model": sel, "chosen": kept, "rung_scores": at_rung,
                        "exhaustive_choice": choose(final), "agrees": kept == choose(final),
                        "train_seconds": round(seconds, 1)})
    return out


def selection_agreement(runs: list[dict]) -> list[dict]:
    """Per (dataset, seed): the preset `odmt train --model odmt-auto` kept by successive halving, and the one
    the exhaustive selection (both candidates trained to the end, odmt-select) keeps."""
    by_key = {(r["dataset"], r["model"], r["seed"]): r for r in runs}
    return [{"dataset": ds, "seed": seed, "halving": r.get("chosen"), "exhaustive": by_key[(ds, "odmt-select", seed)]["chosen"],
             "agrees": r.get("chosen") == by_key[(ds, "odmt-select", seed)]["chosen"]}
            for (ds, m, seed), r in sorted(by_key.items()) if m == "odmt-auto" and (ds, "odmt-select", seed) in by_key]


def _logged_seconds(run: Path) -> float:
    """Training + validation time of every epoch in RUN/log.jsonl (across resumes); of a model selection,
    every candidate's epochs."""
    from odmt_t4r.contract import CANDIDATES
    logs = sorted((run / CANDIDATES).glob("*/log.jsonl")) or [run / "log.jsonl"]
    lines = [line for log in logs for line in log.read_text().splitlines()]
    return round(sum(json.loads(line)["seconds"] for line in lines if line.strip()), 1)


def aggregate(runs: list[dict]) -> dict:
    table = {}
    for r in runs:
        table.setdefault(r["dataset"], {}).setdefault(r["model"], []).append(r)
    out = {}
    for ds, models in table.items():
        for m, rs in models.items():
            row = {"seeds": [r["seed"] for r in rs], "minutes_per_run": round(statistics.mean(r["train_seconds"] for r in rs) / 60, 1)}
            flat = [{**r, **{f"valid/{k}": v for k, v in r.get("valid", {}).items()}} for r in rs]
            keys = sorted({k for r in flat for k, v in r.items() if isinstance(v, float) and "@" in k})
            for k in keys:
                vals = [r[k] for r in flat if k in r]
                row[k] = {"mean": round(statistics.mean(vals), 4), "std": round(statistics.pstdev(vals), 4) if len(vals) > 1 else 0.0}
            row["seconds_per_run"] = round(statistics.median(r["train_seconds"] for r in rs), 1)
            out.setdefault(ds, {})[m] = row
    for models in out.values():  # wall time per run (median over seeds) over sasrec's, the same machine and run
        base = models.get("sasrec", {}).get("seconds_per_run")
        for row in models.values():
            row["time_over_sasrec"] = round(row["seconds_per_run"] / base, 2) if base else None
    return out


def markdown(agg: dict) -> str:
    lines = []
    for ds, models in agg.items():
        cols = [*METRICS, *TABLE_EXTRA]
        lines += [f"**{ds}** (test, full ranking, history excluded; mean ± std over seeds)", "",
                  "| model | " + " | ".join(cols) + " | seeds | min/run | time / sasrec |", "|---" * (len(cols) + 4) + "|"]
        for m, row in models.items():
            cells = [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" if k in row else "-" for k in cols]
            ratio = row.get("time_over_sasrec")
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(row['seeds'])} | {row['minutes_per_run']} | "
                         + (f"{ratio:.1f}x |" if ratio is not None else "- |"))
        if source_of(ds) == "ml-100k":
            for name, vals in RECBOLE_ML100K.items():
                lines.append(f"| {name} (anchor, 1 seed) | " + " | ".join(f"{vals[k]:.4f}" for k in METRICS)
                             + " |" * len(TABLE_EXTRA) + " | 1 | |")
        lines.append("")
    return "\n".join(lines)


# the figures before the cost work (test NDCG@10 mean, std over 3 seeds; the IMT as odmt, averaged odmt-auto):
# the cost work must not lose more than one of those standard deviations
BEFORE_COST_WORK = {"odmt": {"ml-100k": (0.1127, 0.0017), "fashion": (0.0666, 0.0002), "sparse-text": (0.0573, 0.0014)},
                    "odmt-auto": {"ml-100k": (0.1136, 0.0005), "fashion": (0.0691, 0.0013), "sparse-text": (0.0582, 0.0018)}}
TIME_TARGETS = {"odmt": 3.0, "odmt-auto": 5.0}  # wall time per run over sasrec's, at most


def goals(agg: dict) -> dict:
    """The targets, checked on the 3-seed test means: [{goal, value, target, met}]."""
    out = []

    def ndcg(ds, m, key="NDCG@10"):
        row = agg.get(ds, {}).get(m, {})
        return (row[key]["mean"], row[key]["std"]) if key in row else (None, None)

    def add(goal, value, target, met):
        out.append({"goal": goal, "value": value, "target": target, "met": bool(met)})

    best_recbole = max(v["NDCG@10"] for v in RECBOLE_ML100K.values())
    for ds in agg:
        for entry, limit in TIME_TARGETS.items():
            ratio = agg[ds].get(entry, {}).get("time_over_sasrec")
            if ratio is not None:
                add(f"{ds}: {entry} wall time / sasrec's", ratio, f"<= {limit}", ratio <= limit)
            value, _ = ndcg(ds, entry)
            before = BEFORE_COST_WORK.get(entry, {}).get(ds)
            if value is not None and before is not None:
                add(f"{ds}: {entry} test NDCG@10 vs before the cost work", round(value, 4),
                    f">= {before[0]} - {before[1]}", value >= before[0] - before[1])
        odmt, odmt_sd = ndcg(ds, "odmt")
        sas, _ = ndcg(ds, "sasrec")
        if odmt is None or sas is None:
            continue
        for entry in ("odmt", *(m for m in SELECTIONS if m in agg[ds])):  # the preset, and the selections run
            value, _ = ndcg(ds, entry)
            add(f"{ds}: {entry} / our sasrec", round(value / sas, 3), ">= 1.10", value >= 1.10 * sas)
            if source_of(ds) == "ml-100k":
                add(f"{ds}: {entry} NDCG@10 vs best RecBole anchor (GRU4Rec 0.1073)", round(value, 4),
                    f">= {1.10 * best_recbole:.4f}", value >= 1.10 * best_recbole)
        for other in ("late-fusion", "odmt-no-kd" if "odmt-no-kd" in agg[ds] else "odmt"):  # odmt: KD off
            value, sd = ndcg(ds, other)
            if value is not None and ds in agg and "odmt-kd" in agg[ds]:
                kd, kd_sd = ndcg(ds, "odmt-kd")
                add(f"{ds}: distillation (odmt-kd) beats {other} by > 1 std", round(kd - value, 4),
                    f"> {max(kd_sd, sd):.4f}", kd - value > max(kd_sd, sd))
        tail, _ = ndcg(ds, "odmt", "longtail/NDCG@10")
        tail_sas, _ = ndcg(ds, "sasrec", "longtail/NDCG@10")
        cover, _ = ndcg(ds, "odmt", "coverage@10")
        if source_of(ds) == "fashion" and tail is not None:
            add(f"{ds}: long-tail NDCG@10 of odmt", round(tail, 4), ">= 0.02 and >= 1.3x sasrec "
                f"({tail_sas:.4f})", tail >= 0.02 and tail >= 1.3 * (tail_sas or 0))
            add(f"{ds}: coverage@10 of odmt", round(cover, 4), ">= 0.25", cover >= 0.25)
    return {"checks": out}


def goal_table(goal: dict) -> str:
    lines = ["| goal | ours | target | met |", "|---|---|---|---|"]
    lines += [f"| {c['goal']} | {c['value']} | {c['target']} | {'yes' if c['met'] else 'no'} |" for c in goal["checks"]]
    return "\n".join(lines)


def epoch_caps(specs: list[str], datasets: list[str]) -> dict[str, int]:
    """["20"] or ["ml-100k=20", "fashion=12"] -> {dataset: cap} for every dataset."""
    caps, default = {}, None
    for spec in specs:
        name, _, value = spec.rpartition("=")
        if name:
            caps[name] = int(value)
        else:
            default = int(value)
    missing = [d for d in datasets if d not in caps and default is None]
    if missing:
        raise SystemExit(f"--epochs gives no cap for {missing}")
    return {d: caps.get(d, default) for d in datasets}


def _report(r: dict) -> dict:
    print(f"{r['dataset']} {r['model']} seed {r['seed']}: " + " ".join(f"{k} {r[k]:.4f}" for k in METRICS)
          + f" ({r['train_seconds'] / 60:.1f} min)", flush=True)
    return r


def _one_run_job(job: tuple) -> dict:
    import torch
    torch.set_num_threads(1)
    return one_run(*job)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["ml-100k", "fashion"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *VARIANTS, *SELECTIONS, *HALVING])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", nargs="+", default=None,
                    help="epoch cap, the same for every model: N, or DATASET=N per dataset "
                         "(default: TrainConfig's ceiling; early stopping ends runs)")
    ap.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: TrainConfig's)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one torch thread each")
    ap.add_argument("--work", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--write-docs", action="store_true",
                    help="also rewrite the tables in docs/benchmarks/quality.md (the full benchmark's run)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tabulate the runs already finished in WORK (a partial benchmark)")
    args = ap.parse_args()
    work = Path(args.work)
    caps = epoch_caps(args.epochs, args.datasets) if args.epochs else {d: None for d in args.datasets}
    jobs = []
    for ds in args.datasets:
        data = prepared(ds, work)
        for seed in args.seeds:
            jobs += [(ds, model, seed, data, work, caps[ds], args.patience) for model in trained(args.models)]
    if args.report_only:
        done = [j for j in jobs if benchmark_record(run_dir(work, *j[:3], j[5], j[6])) is not None]
        print(f"report only: {len(done)} of {len(jobs)} runs finished")
        jobs = done
    runs = []
    # seed by seed (a partial benchmark still compares every model), the slow IMT runs first in each
    jobs.sort(key=lambda j: (j[2], j[1] != "odmt-imt", j[1] in ("sasrec", "late-fusion")))
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from odmt_t4r.parallel import die_with_parent  # killed alone, workers would train on
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as pool:
            for future in as_completed([pool.submit(_one_run_job, j) for j in jobs]):
                runs.append(_report(future.result()))
    else:
        runs = [_report(_one_run_job(j)) for j in jobs]
    runs = ([r for r in runs if r["model"] in args.models] + composed_selections(runs, args.models)
            + composed_halving(runs, args.models))
    agreement = selection_agreement(runs)
    order = {m: i for i, m in enumerate([*MODELS, *VARIANTS, *SELECTIONS, *HALVING])}
    runs.sort(key=lambda r: (r["dataset"], order.get(r["model"], 99), r["seed"]))
    agg = aggregate(runs)
    goal = goals(agg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "quality", "epochs_cap": caps, "patience": args.patience,
                                          "aggregate": agg,
                                          "goal": goal, "selection_agreement": agreement, "anchor": RECBOLE_ML100K,
                                          "runs": runs}, indent=2, default=str))
    print(markdown(agg))
    print(goal_table(goal))
    for a in agreement:
        print(f"{a['dataset']} seed {a['seed']}: odmt-auto kept {a['halving']}, the exhaustive selection {a['exhaustive']}")
    print(f"wrote {args.out}")
    if args.write_docs:
        from docs_page import write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

        command = "python benchmarks/quality.py " + " ".join(a for a in sys.argv[1:] if a != "--write-docs")
        print(f"wrote {write_block('quality.md', 'quality', markdown(agg) + chr(10) + goal_table(goal), command)}")


if __name__ == "__main__":
    main()
