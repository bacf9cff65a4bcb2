#!/usr/bin/env bash
# The GPU route against the CPU path, on one GPU in at most 8 minutes (conda/environment-gpu.yml, then its
# two pip steps). Prepares the fashion store on cuDF (one process, and a one-GPU LocalCUDACluster), trains
# ODMT for 2 epochs at batch 32 (about 430 steps) on CUDA in fp32 and with mixed precision, evaluates, and
# does the same on the CPU in parallel (CUDA_VISIBLE_DEVICES= hides the GPU: no code change, no flag).
# Checks: the prepared folders equal row for row (splits, vocabularies, items table); the frozen features
# within 2% of the largest value; test metrics within a tolerance. Figures on stdout, JSON in $OUT or ./gpu_check/.
# Exit 0 only when every check passes.
#   env: FASHION_MNIST_DIR (else /usr/share/datasets/fashion-mnist), N_ITEMS (3000), THREADS (CPU path, 8),
#        TOL_NDCG (0.02) and TOL_HR (0.04): absolute bounds on the fused test NDCG@10 / HR@10 differences
#        (CPU and CUDA draw different random numbers from one seed, so the runs differ like two seeds do),
#        BUDGET_S (480)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-$PWD/gpu_check}
WORK=${WORK:-$RESULTS/work}
BUDGET_S=${BUDGET_S:-480}
N_ITEMS=${N_ITEMS:-3000}
THREADS=${THREADS:-8}
MNIST=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
ODMT=${ODMT:-odmt}
PY=${PYTHON:-python}
mkdir -p "$RESULTS" "$WORK"
START=$(date +%s)
T0=$START

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
run() {  # NAME CMD...: runs CMD within what is left of the budget, logs to WORK/NAME.log, records seconds
  local name=$1; shift
  local t=$(date +%s) limit; limit=$(left)
  if [ "$limit" -le 5 ]; then say "$name: no time left in the ${BUDGET_S}s budget"; return 124; fi
  timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log"
  local rc=$?
  echo "$name $(( $(date +%s) - t )) $rc" >>"$WORK/stages.txt"
  [ $rc -eq 0 ] || { say "$name failed (exit $rc); last lines of $WORK/$name.log:"; tail -5 "$WORK/$name.log" >&2; }
  return $rc
}

# --- preflight: the GPU stack is there and the code picks it on its own ---------------------------
[ -d "$MNIST" ] || { say "no Fashion-MNIST at $MNIST: apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR"; exit 2; }
$PY - <<'EOF' >"$RESULTS/environment.json" || { say "the GPU stack is incomplete (see conda/environment-gpu.yml)"; exit 2; }
import json, sys
import cudf, dask, merlin.core, nvtabular, pandas, torch
from workflows import on_gpu
from odmt_t4r.features import FeatureConfig
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert on_gpu(), "merlin does not see the GPU or cudf (NVTabular would run on pandas)"
assert FeatureConfig().torch_device() == "cuda"
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "torch": torch.__version__,
                  "cudf": cudf.__version__, "nvtabular": nvtabular.__version__, "pandas": pandas.__version__,
                  "dask": dask.__version__, "python": sys.version.split()[0]}, indent=1))
EOF
say "GPU stack: $(tr -d '\n' <"$RESULTS/environment.json")"
HELP=$($ODMT train --help 2>&1)
TRAIN=(--model odmt --epochs 2 --batch-size 32 --seed 0 --no-progress)
AMP=()
grep -q -- "--amp" <<<"$HELP" && AMP=(--amp bf16) || say "odmt train has no --amp here: the mixed-precision run is skipped"
DEVICE_CUDA=(); DEVICE_CPU=()
grep -q -- "--device" <<<"$HELP" && { DEVICE_CUDA=(--device cuda); DEVICE_CPU=(--device cpu); }
PREP=(--source fashion --n-items "$N_ITEMS" --fashion-mnist-dir "$MNIST")
rm -rf "$WORK"/{gpu,gpu-dask,cpu} "$WORK/stages.txt"

# --- the CPU path, in the background (its own feature cache, so its encoders really run) ----------
(
  export CUDA_VISIBLE_DEVICES= ODMT_CACHE_DIR="$WORK/cache-cpu"
  run cpu-prepare $ODMT prepare "${PREP[@]}" --out "$WORK/cpu/data" \
    && run cpu-train $ODMT train --data "$WORK/cpu/data" --out "$WORK/cpu/run" "${TRAIN[@]}" "${DEVICE_CPU[@]}" --threads "$THREADS" \
    && run cpu-evaluate $ODMT evaluate --run "$WORK/cpu/run" --split test --no-progress --threads "$THREADS"
) &
CPU_PID=$!

# --- the GPU path ---------------------------------------------------------------------------------
export ODMT_CACHE_DIR="$WORK/cache-gpu"
ok=1
run gpu-prepare $ODMT prepare "${PREP[@]}" --out "$WORK/gpu/data" || ok=0
run gpu-dask-prepare $ODMT prepare "${PREP[@]}" --dask-workers 1 --out "$WORK/gpu-dask/data" || ok=0
if [ $ok = 1 ]; then
  run gpu-train-fp32 $ODMT train --data "$WORK/gpu/data" --out "$WORK/gpu/run-fp32" "${TRAIN[@]}" "${DEVICE_CUDA[@]}" \
    && run gpu-evaluate-fp32 $ODMT evaluate --run "$WORK/gpu/run-fp32" --split test --no-progress || ok=0
  if [ ${#AMP[@]} -gt 0 ]; then
    run gpu-train-bf16 $ODMT train --data "$WORK/gpu/data" --out "$WORK/gpu/run-bf16" "${TRAIN[@]}" "${DEVICE_CUDA[@]}" "${AMP[@]}" \
      && run gpu-evaluate-bf16 $ODMT evaluate --run "$WORK/gpu/run-bf16" --split test --no-progress || ok=0
  fi
fi
wait $CPU_PID || ok=0
say "all stages done; comparing"

# --- compare and report ---------------------------------------------------------------------------
WORK="$WORK" RESULTS="$RESULTS" TOL_NDCG=${TOL_NDCG:-0.02} TOL_HR=${TOL_HR:-0.04} STAGES_OK=$ok $PY - <<'EOF'
import json, os
from pathlib import Path

import numpy as np
import pandas as pd

from odmt_t4r.prepare import read_split

work, results = Path(os.environ["WORK"]), Path(os.environ["RESULTS"])
tol = {"NDCG@10": float(os.environ["TOL_NDCG"]), "HR@10": float(os.environ["TOL_HR"])}
checks, figures = {}, {"stages_s": {}, "stage_exit_codes": {}}
for line in (work / "stages.txt").read_text().splitlines() if (work / "stages.txt").exists() else []:
    name, seconds, rc = line.split()
    figures["stages_s"][name], figures["stage_exit_codes"][name] = int(seconds), int(rc)


def differs(what: str, x: pd.DataFrame, y: pd.DataFrame) -> str:
    try:
        pd.testing.assert_frame_equal(x, y)  # row for row; list cells compared element by element
        return ""
    except AssertionError as exc:
        return f"{what}: " + " ".join(str(exc).split())[:300]


def same_prepared(a: Path, b: Path) -> str:
    """'' when the two prepared folders hold the same rows in the same order, else what differs."""
    if not (a / "manifest.json").exists() or not (b / "manifest.json").exists():
        return "a prepared folder is missing"
    names = sorted(p.relative_to(a) for p in (a / "categories").rglob("*.parquet"))
    if names != sorted(p.relative_to(b) for p in (b / "categories").rglob("*.parquet")):
        return "vocabulary files differ"
    pairs = [(split, read_split(a / split), read_split(b / split)) for split in ("train", "valid", "test")]
    pairs += [(str(n), pd.read_parquet(a / n), pd.read_parquet(b / n)) for n in names]
    pairs += [("items.parquet", pd.read_parquet(a / "items.parquet"), pd.read_parquet(b / "items.parquet"))]
    return next((d for d in (differs(*p) for p in pairs) if d), "")


gpu, cpu, dask_gpu = work / "gpu/data", work / "cpu/data", work / "gpu-dask/data"
for name, (a, b) in {"prepare_gpu_equals_cpu": (cpu, gpu), "prepare_dask_gpu_equals_gpu": (gpu, dask_gpu)}.items():
    diff = same_prepared(a, b)
    checks[name] = {"ok": not diff, "detail": diff or "row for row"}

feats = {}
for m in ("text", "image"):
    if (gpu / "features" / f"{m}.npy").exists() and (cpu / "features" / f"{m}.npy").exists():
        g = np.load(gpu / "features" / f"{m}.npy").astype(np.float32)
        c = np.load(cpu / "features" / f"{m}.npy").astype(np.float32)
        scale = float(np.abs(c).max()) or 1.0
        feats[m] = {"max_abs_diff": float(np.abs(g - c).max()), "max_abs_value": scale,
                    "relative": float(np.abs(g - c).max() / scale)}
checks["features_gpu_close_to_cpu"] = {"ok": bool(feats) and all(f["relative"] < 2e-2 for f in feats.values()),
                                       "detail": feats or "features missing"}

metrics = {}
for name, run in {"cpu": work / "cpu/run", "gpu_fp32": work / "gpu/run-fp32", "gpu_bf16": work / "gpu/run-bf16"}.items():
    f = run / "metrics-test.json"
    if f.exists():
        m = json.loads(f.read_text())
        metrics[name] = {k: m[k] for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20") if k in m}
figures["test_metrics"] = metrics
for name in ("gpu_fp32", "gpu_bf16"):
    if name == "gpu_bf16" and name not in metrics and figures["stages_s"].get("gpu-train-bf16") is None:
        continue  # no --amp in this odmt: skipped, and said so above
    if "cpu" not in metrics or name not in metrics:
        checks[f"metrics_{name}_close_to_cpu"] = {"ok": False, "detail": "a run did not finish"}
        continue
    diffs = {k: round(metrics[name][k] - metrics["cpu"][k], 4) for k in tol}
    checks[f"metrics_{name}_close_to_cpu"] = {"ok": all(abs(d) <= tol[k] for k, d in diffs.items()),
                                              "detail": {"differences": diffs, "tolerance": tol}}
for run in ("cpu/run", "gpu/run-fp32", "gpu/run-bf16"):
    log = work / run / "log.jsonl"
    if log.exists():
        figures.setdefault("train_log_last_epoch", {})[run] = json.loads(log.read_text().splitlines()[-1])

report = {"check": "gpu_check", "environment": json.loads((results / "environment.json").read_text()),
          "stages_ok": os.environ["STAGES_OK"] == "1", "checks": checks, "figures": figures}
report["ok"] = report["stages_ok"] and all(c["ok"] for c in checks.values())
(results / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"{'check':<34} result")
for name, c in checks.items():
    print(f"{name:<34} {'PASS' if c['ok'] else 'FAIL'}  {json.dumps(c['detail'])}")
print("stage seconds:", json.dumps(figures["stages_s"]))
for name, m in metrics.items():
    print(f"test metrics {name:<9}", "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
print(f"{'ALL PASS' if report['ok'] else 'FAILED'}; wrote {results / 'gpu_check.json'}")
raise SystemExit(0 if report["ok"] else 1)
EOF
rc=$?
say "done in $(( $(date +%s) - T0 ))s (budget ${BUDGET_S}s)"
exit $rc
