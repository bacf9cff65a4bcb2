"""`odmt run`: the main job in one command, from a source to recommendations served by Triton and a report.

    odmt run [--source fashion|ml-100k|csv|parquet ...] [--out WORK] [--epochs N] [--model odmt] [--baseline sasrec]

Stages, in order (each one reads what the ones before it wrote):

    prepare          the source -> WORK/data                  (odmt prepare)
    train-<model>    WORK/data -> WORK/runs/<model>           (odmt train; ODMT and the ID-only baseline)
    evaluate-<model> WORK/runs/<model>/metrics-test.json      (odmt evaluate --split test)
    export           WORK/runs/<model> -> WORK/repo           (odmt export)
    serve            starts tritonserver on WORK/repo, sends held-out test sessions over HTTP and gRPC,
                     prints the answers with item text, stops it; WORK/served.json
    report           WORK/report.html                         (odmt report)

Each stage writes a record `WORK/stages/<stage>.json`: its inputs (settings and the sha256 of what it
read), the sha256 of what it wrote, its time. A later `odmt run` on the same WORK skips a stage whose
record is finished, whose inputs are unchanged and whose outputs are still as written; a stage whose
inputs changed runs again, and so does everything after it whose inputs it changes. A stage that fails
(or is interrupted) names itself and why; running the same command again resumes there, and a training
stage continues from its last finished epoch.

Logs and progress go to stderr (plain lines when stderr is not a terminal); results go to stdout: the
data summary, the test metrics side by side, the served answers and the report's path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from odmt_t4r.errors import headline
from odmt_t4r.contract import PreparedDir, RunFolder, is_run_write, read_selection
from odmt_t4r.flags import add_flags, flag, given
from odmt_t4r.prepare import PrepareConfig

STAGE_FORMAT = "odmt-stage/1"
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str | None:
    from odmt_t4r.trust import sha256_file

    return sha256_file(path) if path.is_file() else None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- stage records -------------------------------------------------------------------------------------

class StageFailed(ValueError):
    """A stage raised: the message names the stage, the cause and how to resume."""


@dataclass
class Stage:
    name: str
    inputs: dict  # JSON: settings and the sha256 of what the stage reads
    outputs: list[str]  # files (relative to WORK) whose sha256 the record keeps
    run: Callable[[bool], dict | None]  # run(resume) -> facts for the record; resume: the last try did not finish
    verify: Callable[[], object] | None = None  # raises when the outputs are no longer whole (checked on skip)
    resume_note: str = ""  # what resuming means for this stage


@dataclass
class StageRecords:
    """WORK/stages/<stage>.json: {"status": "running" | "failed" | "done", inputs, outputs, seconds, facts}."""

    work: Path
    say: Callable[[str], None] = log
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # ran or skipped, in order

    @property
    def folder(self) -> Path:
        return self.work / "stages"

    def read(self, name: str) -> dict | None:
        try:
            record = json.loads((self.folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("format") == STAGE_FORMAT else None

    def _write(self, name: str, record: dict) -> None:
        from odmt_t4r.output_folder import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / f"{name}.json", json.dumps(record, indent=2, default=str) + "\n", fsync=False)

    def outputs_now(self, stage: Stage) -> dict[str, str | None]:
        return {rel: sha256_of(self.work / rel) for rel in stage.outputs}

    def finished(self, stage: Stage, key: str) -> dict | None:
        """The stage's record when it can be skipped: done, same inputs, outputs as written."""
        record = self.read(stage.name)
        if not record or record.get("status") != "done" or record.get("inputs_sha256") != key:
            return None
        if record.get("outputs") != self.outputs_now(stage):
            self.say(f"{stage.name}: its outputs changed since it finished; running it again")
            return None
        if stage.verify is not None:
            try:
                stage.verify()
            except Exception as exc:  # noqa: BLE001 - any doubt about the outputs: rebuild them
                self.say(f"{stage.name}: {str(exc).splitlines()[0]}; running it again")
                return None
        return record

    def run(self, stage: Stage) -> dict:
        key = _digest(stage.inputs)
        record = self.finished(stage, key)
        if record is not None:
            self.skipped.append(stage.name)
            self.done.append(stage.name)
            self.say(f"{stage.name}: done earlier ({record['seconds']:.1f}s), inputs unchanged: skipped")
            return record
        before = self.read(stage.name)
        resume = bool(before and before.get("status") in ("running", "failed") and before.get("inputs_sha256") == key)
        record = {"format": STAGE_FORMAT, "stage": stage.name, "status": "running", "inputs_sha256": key,
                  "inputs": stage.inputs, "started": _now(), "resumed": resume}
        self._write(stage.name, record)
        self.say(f"{stage.name}: {'resuming' if resume else 'running'}")
        t0 = time.perf_counter()
        try:
            facts = stage.run(resume) or {}
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
            self._write(stage.name, {**record, "status": "failed", "error": reason,
                                     "seconds": round(time.perf_counter() - t0, 2)})
            if isinstance(exc, Exception):
                raise self.failure(stage, exc) from exc
            self.say(f"interrupted in stage '{stage.name}'; run the same command again to resume there")
            raise
        record.update(status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 2),
                      outputs=self.outputs_now(stage), facts=facts)
        self._write(stage.name, record)
        self.ran.append(stage.name)
        self.done.append(stage.name)
        self.say(f"{stage.name}: done in {record['seconds']:.1f}s")
        return record

    def failure(self, stage: Stage, exc: Exception) -> StageFailed:
        """The message: the cause's details first, then one line naming the stage, the cause and the way on."""
        first, details = headline(exc)
        kept = f"; {', '.join(self.done)} stay done and will be skipped" if self.done else ""
        note = f" ({stage.resume_note})" if stage.resume_note else ""
        return StageFailed(f"{details}\n" * bool(details) +
                           f"stage '{stage.name}' failed: {first}. Fix the cause and run the same `odmt run` "
                           f"command again to resume at '{stage.name}'{note}{kept}")


# -- the work folder -----------------------------------------------------------------------------------

class WorkFolder:
    """WORK: new, empty, or one that `odmt run` wrote (it has stages/); held by one `odmt run` at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().resolve()
        self._fd: int | None = None

    def __enter__(self) -> Path:
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {p} is a file, not a folder; give a folder path")
        if p.is_dir() and any(p.iterdir()) and not (p / "stages").is_dir():
            entries = sorted(x.name for x in p.iterdir())
            raise ValueError(f"--out {p} is not empty and is not a folder `odmt run` wrote (no stages/; holds "
                             f"{', '.join(entries[:3])}{'...' if len(entries) > 3 else ''}); choose another --out")
        (p / "stages").mkdir(parents=True, exist_ok=True)
        fd = os.open(p / ".odmt-run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ValueError(f"another `odmt run` is using {p} ({holder}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return p

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


# -- settings ------------------------------------------------------------------------------------------

# the prepare settings `odmt run` offers (the rest keep PrepareConfig's defaults; `odmt prepare` has them all)
RUN_PREPARE_FIELDS = ("source", "interactions", "items", "timestamp_format", "n_items", "max_length", "fashion_mnist_dir")


@dataclass
class RunOptions:
    """`odmt run`: its own settings, and the prepared data's (a PrepareConfig whose `out` is WORK/data)."""

    out: str = field(default="work", metadata=flag("the work folder WORK"))
    model: str = field(default="odmt", metadata=flag("the model"))
    baseline: str = field(default="sasrec", metadata=flag("the model it is compared with"))
    # a demonstration budget; benchmarks/quality.py trains to convergence
    epochs: int = field(default=5, metadata=flag("epoch budget of both models"))
    seed: int | None = field(default=None, metadata=flag("training seed", none="TrainConfig's"))
    config: str | None = field(default=None, metadata=flag(
        'JSON of TrainConfig / OdmtConfig fields for both models (e.g. {"d_model": 32})'))
    sessions: int = field(default=4, metadata=flag("held-out test sessions sent to the server and shown in the report"))
    k: int = field(default=10, metadata=flag("recommendations per session"))
    transform: str = field(default="fast", metadata=flag("the served request transform (see `odmt export`)",
                                                         choices=("fast", "workflow")))
    sessions_seed: int = 0
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


def prepare_config(o: RunOptions, work: Path) -> PrepareConfig:
    cfg = replace(o.prepare, out=str(work / "data"))
    cfg.validate()
    return cfg


def train_settings(o: RunOptions, model: str) -> dict:
    """The training settings of one model: the --config file, then --epochs / --seed, then the model (a
    preset or a named selection), as the RUN records them (selection.recorded_settings)."""
    from odmt_t4r.training.command import read_config_file
    from odmt_t4r.training.selection import recorded_settings, resolve

    settings = read_config_file(o.config)
    if o.seed is not None:
        settings["seed"] = o.seed
    if settings.get("candidates"):  # a selection is a RUN of its own (selection.py); the report compares two models
        raise ValueError("--config sets candidates; odmt run trains --model and --baseline, choose them there "
                         "(odmt train --candidates trains a model selection)")
    settings.update(model=model, epochs=o.epochs, progress=True)
    return recorded_settings(*resolve(settings))


def check_options(o: RunOptions) -> None:
    from odmt_t4r.training.selection import MODEL_CHOICES

    for name in ("epochs", "sessions", "k"):
        if getattr(o, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(o, name)}")
    for option, name in (("--model", o.model), ("--baseline", o.baseline)):
        if name not in MODEL_CHOICES:
            raise ValueError(f"{option} {name!r} is not a model; choose one of {MODEL_CHOICES}")
    if o.model == o.baseline:
        raise ValueError(f"--model and --baseline are both {o.model!r}; the report compares two models")


# -- the stages ----------------------------------------------------------------------------------------

def prepare_stage(o: RunOptions, work: Path) -> Stage:
    from odmt_t4r.prepare import FORMAT, prepare
    from odmt_t4r.trust import verify_folder

    cfg = prepare_config(o, work)
    files = {name: sha256_of(Path(p)) for name, p in (("interactions", cfg.interactions), ("items", cfg.items)) if p}
    files["referenced"] = referenced_files(cfg)  # the photos the items file points to: prepare encodes them
    settings = {k: v for k, v in asdict(cfg).items() if k != "out"}

    def run(resume: bool) -> dict:
        manifest = prepare(cfg)  # builds aside and swaps in; replaces WORK/data only because odmt wrote it
        return {"counts": manifest["counts"], "modalities": manifest["modalities"]}

    return Stage("prepare", {"settings": settings, "files": files}, ["data/manifest.json"], run,
                 verify=lambda: verify_folder(work / "data", FORMAT, "prepared folder"))


def referenced_files(cfg) -> dict[str, str | None]:
    """{path as written: sha256} of every file the items table points to (its image column, resolved as
    prepare resolves it: relative to the items file), so a photo changed on disk changes the stage's inputs."""
    if not cfg.items or cfg.source not in ("csv", "parquet"):
        return {}
    from odmt_t4r.data.sources import _read_table

    try:
        table = _read_table(cfg.items, cfg.source)
    except Exception:  # noqa: BLE001 - prepare reports an unreadable items file
        return {}
    if "image" not in table:
        return {}
    base = Path(cfg.items).parent
    cells = [str(c) for c in table["image"].dropna() if str(c).strip()]
    return {c: sha256_of(Path(c) if Path(c).is_absolute() else base / c) for c in sorted(set(cells))}


def _foreign_run_files(run_dir: Path) -> list[str]:
    """Files in a RUN (and its candidates/<preset>/ RUNs) that no odmt command writes there."""
    out = []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        inside_candidate = len(rel.parts) == 3 and rel.parts[0] == "candidates"
        ours = (len(rel.parts) == 1 or inside_candidate) and is_run_write(p.name)
        if (p.is_file() or p.is_symlink()) and not ours:
            out.append(rel.as_posix())
    return out


def _remove_run(run_dir: Path) -> None:
    """Clears a RUN that `odmt run` trained earlier, before training it again from scratch. The project's
    files only: a RUN holding anything else is moved aside whole (RUN.backup-<time>), never deleted."""
    if not run_dir.exists():
        return
    if not RunFolder(run_dir).is_ours() and read_selection(run_dir) is None and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds files that are not an odmt training run; move them away")
    foreign = _foreign_run_files(run_dir)
    if foreign:
        backup = run_dir.with_name(f"{run_dir.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while backup.exists():
            backup, n = run_dir.with_name(f"{run_dir.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        os.rename(run_dir, backup)
        log(f"{run_dir} holds {len(foreign)} file(s) odmt did not write (e.g. {', '.join(foreign[:3])}): moved the "
            f"old RUN aside to {backup} (nothing was deleted) before training again")
        return
    shutil.rmtree(run_dir)


def _resumable(run_dir: Path, settings: dict, data_sha256: str | None) -> bool:
    """RUN holds a checkpoint of training with exactly these settings on this data (a stage killed before it
    cleared an older RUN must not resume that one)."""
    same = lambda d: {k: v for k, v in json.loads(json.dumps(d, default=str)).items() if k != "progress"}  # noqa: E731
    selection = read_selection(run_dir)
    if selection is not None:  # a model selection: its candidates resume from their own checkpoints
        return same(selection["train"]) == same(settings) and selection.get("data_sha256") == data_sha256
    run = RunFolder(run_dir)
    return (run.can_resume() and same(run.train_settings()) == same(settings)
            and run.recorded_data().get("manifest_sha256") == data_sha256)


def train_stage(o: RunOptions, work: Path, model: str) -> Stage:
    from odmt_t4r.training.selection import train_model

    settings = train_settings(o, model)
    run_dir = work / "runs" / model
    inputs = {"data": sha256_of(work / "data" / "manifest.json"), "train": settings}

    def run(resume: bool) -> dict:
        resume = resume and _resumable(run_dir, settings, inputs["data"])
        if not resume:
            _remove_run(run_dir)  # stale: trained on other data or settings, or never checkpointed
        summary = train_model(settings, work / "data", run_dir, resume=resume)
        return {k: summary[k] for k in ("best_epoch", "epochs_run", "stopped")} | {"fusion": summary["fusion"]["name"]}

    return Stage(f"train-{model}", inputs, [f"runs/{model}/{f}" for f in ("config.json", "model.pt", "log.jsonl")],
                 run, resume_note="training continues from its last finished epoch")


def run_hashes(work: Path, model: str) -> dict:
    return {f: sha256_of(work / "runs" / model / f) for f in ("config.json", "model.pt", "item_vectors.pt")}


def evaluate_stage(work: Path, model: str) -> Stage:
    from odmt_t4r.output_folder import atomic_write
    from odmt_t4r.training.evaluate import evaluate_run

    run_dir = work / "runs" / model
    inputs = {"run": run_hashes(work, model), "data": sha256_of(work / "data" / "manifest.json")}

    def run(resume: bool) -> dict:
        metrics = evaluate_run(run_dir, work / "data", "test")
        atomic_write(run_dir / "metrics-test.json", json.dumps(metrics, indent=2) + "\n", fsync=False)
        return {m: metrics[m] for m in METRICS}

    return Stage(f"evaluate-{model}", inputs, [f"runs/{model}/metrics-test.json"], run)


def export_stage(o: RunOptions, work: Path) -> Stage:
    from odmt_t4r.trust import clear_bytecode_caches, verify_folder
    from triton_models.export import FORMAT, ServingConfig, export

    cfg = ServingConfig(k=o.k, transform=o.transform)
    inputs = {"run": run_hashes(work, o.model), "data": sha256_of(work / "data" / "manifest.json"),
              "serving": asdict(cfg)}

    def run(resume: bool) -> dict:
        manifest = export(work / "runs" / o.model, work / "repo", cfg, data_dir=work / "data", check_sessions=50,
                          log=lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))
        return {"models": manifest["models"], "check": manifest["check"]}

    def verify() -> None:
        clear_bytecode_caches(work / "repo")  # tritonserver's python stub leaves them; `odmt serve` clears them too
        verify_folder(work / "repo", FORMAT, "model repository", strict=True)

    return Stage("export", inputs, ["repo/manifest.json"], run, verify=verify)


def serve_sessions(repo: Path, sessions: list[dict], k: int, server_log: Path) -> dict:
    """Starts tritonserver on `repo` (checked against its manifest first, as `odmt serve` does), asks it for
    each session's top-k over HTTP and gRPC, stops it. Returns the answers and timings. The server reads a
    session's latest `max_length` items and leaves those out of its answers."""
    from odmt_t4r.trust import clear_bytecode_caches, verify_folder
    from triton_models.client import RecommenderClient
    from triton_models.export import FORMAT
    from triton_models.server import TritonServer

    clear_bytecode_caches(repo)  # left by an earlier server; a planted one would bypass the check
    manifest = verify_folder(repo, FORMAT, "model repository (from odmt export)", strict=True)
    server_log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with TritonServer(repo, log_file=server_log) as server:
        ready_s = time.perf_counter() - t
        log(f"tritonserver ready in {ready_s:.1f}s (HTTP {server.http_url}, gRPC {server.grpc_url}); log {server_log}")
        histories = [s["history"] for s in sessions]
        with RecommenderClient(server.http_url, "http") as http, RecommenderClient(server.grpc_url, "grpc") as grpc:
            t = time.perf_counter()
            answers = http.recommend(histories, k)
            request_ms = (time.perf_counter() - t) * 1e3
            over_grpc = grpc.recommend(histories, k)
            # a second request asks which branch drove each answer (a repository exported before them has none)
            explained = http.explain(histories, k) if http.branches else None
        urls = {"http": server.http_url, "grpc": server.grpc_url}
    if over_grpc != answers:
        raise ValueError("the server's HTTP and gRPC answers differ for the same sessions")
    if explained is not None and [[e.item_id for e in r] for r in explained] != [[i for i, _ in r] for r in answers]:
        raise ValueError("the server's explained answers differ from its plain answers for the same sessions")
    out = []
    for n, (s, recs) in enumerate(zip(sessions, answers)):
        ids = [i for i, _ in recs]
        out.append({**s, "answers": [[i, float(score)] for i, score in recs],
                    "target_rank": ids.index(s["target"]) + 1 if s["target"] in ids else None})
        if explained is not None:
            out[-1]["drove"] = [e.drove for e in explained[n]]
            out[-1]["contributions"] = [e.contributions for e in explained[n]]
    return {"k": k, "served": True, "max_length": manifest["max_length"], "server": urls, "server_ready_s": round(ready_s, 2),
            "request_ms": round(request_ms, 2), "grpc_same_answers": True, "sessions": out}


def serve_stage(o: RunOptions, work: Path) -> Stage:
    from odmt_t4r.output_folder import atomic_write
    from odmt_t4r.training.data import sample_sessions

    inputs = {"repo": sha256_of(work / "repo" / "manifest.json"), "sessions": o.sessions, "k": o.k,
              "seed": o.sessions_seed}

    def run(resume: bool) -> dict:
        sessions = sample_sessions(work / "data", o.sessions, seed=o.sessions_seed)
        served = serve_sessions(work / "repo", sessions, o.k, work / "logs" / "tritonserver.log")
        served["repo"] = str(work / "repo")
        atomic_write(work / "served.json", json.dumps(served, indent=2) + "\n", fsync=False)
        return {"request_ms": served["request_ms"], "hits": sum(s["target_rank"] is not None for s in served["sessions"])}

    return Stage("serve", inputs, ["served.json"], run,
                 resume_note=f"the server's log is {work / 'logs' / 'tritonserver.log'}")


def report_stage(o: RunOptions, work: Path) -> Stage:
    from odmt_t4r import report

    reads = [f"runs/{m}/{f}" for m in (o.model, o.baseline) for f in ("metrics-test.json", "log.jsonl", "config.json")]
    inputs = {"files": {rel: sha256_of(work / rel) for rel in [*reads, "served.json", "data/manifest.json"]},
              "code": sha256_of(Path(report.__file__))}

    def run(resume: bool) -> dict:
        path = report.build_report(work / "runs" / o.model, work / "report.html", baseline=work / "runs" / o.baseline,
                                   work=work)
        return {"bytes": path.stat().st_size}

    return Stage("report", inputs, ["report.html"], run)


# -- what the user reads on stdout ---------------------------------------------------------------------

def describe(item_id: str, text: dict, width: int = 78) -> str:
    return textwrap.shorten(f"{item_id}  {text.get(item_id, '')}", width=width, placeholder="...")


def print_comparison(work: Path, models: list[str]) -> None:
    rows = [(m, json.loads((work / "runs" / m / "metrics-test.json").read_text())) for m in models]
    print(f"\ntest split: every item ranked, each user's earlier items excluded ({rows[0][1]['n_users']:,} users)")
    width = max(len(m) for m in models) + 2
    print("model".ljust(width) + "".join(k.rjust(10) for k in METRICS))
    for name, m in rows:
        print(name.ljust(width) + "".join(f"{m[k]:10.4f}" for k in METRICS))
    (first, a), (second, b) = rows[0], rows[-1]
    if b["NDCG@10"]:
        print(f"{first} NDCG@10 / {second} NDCG@10 = {a['NDCG@10'] / b['NDCG@10']:.2f}x")


def print_served(work: Path, show_history: int = 4) -> None:
    served = json.loads((work / "served.json").read_text())
    items = PreparedDir(work / "data").items()
    text = dict(zip(items["item_id"].astype(str), items["text"].fillna(""))) if "text" in items else {}
    print(f"\nserved by Triton (HTTP {served['server']['http']}; gRPC gave the same answers): "
          f"{len(served['sessions'])} held-out test sessions in one request, {served['request_ms']:.1f} ms")
    for n, s in enumerate(served["sessions"], 1):
        history = s["history"]
        print(f"session {n}: {len(history)} items, latest {min(show_history, len(history))}:")
        for item in history[-show_history:]:
            print(f"      {describe(item, text)}")
        print(f"  held-out next item: {describe(s['target'], text)}")
        print(f"  top-{served['k']} (served):")
        drove = s.get("drove") or [""] * len(s["answers"])  # absent in a WORK served before explanations
        for rank, ((item, score), branch) in enumerate(zip(s["answers"], drove), 1):
            mark = "  <- the held-out next item" if item == s["target"] else ""
            print(f"  {rank:>3}. {score:8.3f}  {branch:<6}  {describe(item, text, 66)}{mark}")


# -- the command ---------------------------------------------------------------------------------------

def run_pipeline(o: RunOptions) -> dict:
    """Runs (or resumes) every stage into WORK; returns {"work", "report", "ran", "skipped", "seconds"}."""
    from odmt_t4r.prepare import summary

    check_options(o)  # every setting is checked before WORK is touched
    prepare_config(o, Path(o.out))
    for model in (o.model, o.baseline):
        train_settings(o, model)
    t0 = time.perf_counter()
    with WorkFolder(o.out) as work:
        records = StageRecords(work)
        records.run(prepare_stage(o, work))
        print(summary(PreparedDir(work / "data").manifest()), flush=True)
        for model in (o.model, o.baseline):
            records.run(train_stage(o, work, model))
        for model in (o.model, o.baseline):
            records.run(evaluate_stage(work, model))
        print_comparison(work, [o.model, o.baseline])
        records.run(export_stage(o, work))
        records.run(serve_stage(o, work))
        print_served(work)
        records.run(report_stage(o, work))
        seconds = time.perf_counter() - t0
        times = ", ".join(f"{name} {(records.read(name) or {}).get('seconds', 0):.0f}s" for name in records.ran)
        log(f"finished in {seconds:.0f}s" + (f" (ran {times})" if times else "") +
            (f"; skipped {', '.join(records.skipped)}" if records.skipped else ""))
        print(f"\nreport: {work / 'report.html'}", flush=True)
        return {"work": str(work), "report": str(work / "report.html"), "ran": records.ran,
                "skipped": records.skipped, "seconds": round(seconds, 1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, RunOptions, skip=("prepare", "sessions_seed"))
    add_flags(p.add_argument_group("the prepared data (as for `odmt prepare`)"), PrepareConfig, only=RUN_PREPARE_FIELDS)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the stage records itself as interrupted and the run says how to resume."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def run(args: argparse.Namespace) -> int:
    import signal

    options = RunOptions(**given(args, RunOptions, skip=("prepare", "sessions_seed")),
                         prepare=PrepareConfig(**given(args, PrepareConfig, only=RUN_PREPARE_FIELDS)))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run_pipeline(options)
    except Terminated:
        print("odmt run: terminated (SIGTERM); run the same `odmt run` command again to resume where it stopped",
              file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
