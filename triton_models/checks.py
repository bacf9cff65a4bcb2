"""In-process checks of a served graph, run before anything is written: the ensemble must answer like
NVTabular's own `Workflow.transform` followed by an independently loaded (eager) copy of the model.

A difference raises `ServingCheckError` (the export or add-items then writes nothing). Items a RUN gained
through `odmt add-items` are unknown to the workflow's vocabulary: the reference encodes them with the
RUN's own index (`run_item_ids`), the rule the fast lookup must follow.

Small catalogs: a session may leave fewer than k unseen items (a catalog smaller than k, or a session
holding every item). The answer then holds what is left, padded with b"" IDs and -inf scores, the
same in-process (`reference_recommend`, `check_in_process`) and served.

Explanations (the optional `contribution_<branch>` outputs) are checked the same way, against
`reference_explain`: odmt_t4r/model/explain.py's BranchExplainer on the independent model, and the
`unknown_ids` output against `reference_unknown_ids` (the raw IDs the served catalog does not hold).

Business rules (exclude_ids / include_ids, raw IDs per request) are checked the same way: the graph run with
a rule against `reference_recommend(..., rules=...)`, whose rule is resolved here from the RUN's own index
(`reference_item_rules`), and the `unknown_rule_ids` output against the rule's IDs the catalog does not hold.
An attribute filter ("filter": JSON) is evaluated here by plain pandas comparisons on the RUN's attribute table
(`reference_filter_mask`), not by the served graph's precomputed index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from odmt_t4r.contract import ITEM_LIST as INPUT, OOV, SEEN_LIST, catalog_item_ids, read_split, run_item_ids


class ServingCheckError(ValueError):
    """The served graph does not answer like the in-process model: nothing is written (a user error: exit 2)."""


catalog_ids = catalog_item_ids  # index -> raw ID of a prepared DIR (the name the tests and benchmarks use)


def example_sessions(data_dir: str | Path, n: int = 100, split: str = "test", seed: int = 0) -> list[list[str]]:
    """`n` sessions of a split in raw item IDs: each user's whole history before the split's target."""
    import pandas as pd

    frame = read_split(Path(data_dir) / split, [SEEN_LIST])
    items = pd.read_parquet(Path(data_dir) / "items.parquet", columns=["item_idx", "item_id"])
    raw = dict(zip(items["item_idx"].tolist(), items["item_id"].astype(str).tolist()))
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(frame), size=min(n, len(frame)), replace=False)
    return [[raw[int(i)] for i in frame[SEEN_LIST].iloc[r]] for r in sorted(rows)]


def reference_encode(workflow, sessions: Sequence[Sequence[str]], item_ids: np.ndarray | None = None,
                     column: str = INPUT) -> list[np.ndarray]:
    """NVTabular's `Workflow.transform` of raw sessions (each cut to its last L items), with the IDs it
    maps to OOV but `item_ids` (index -> raw ID, e.g. `run_item_ids`) indexes replaced by that index."""
    import pandas as pd

    from triton_models.graph import vocabulary_ids

    encoded = [np.array(v, dtype=np.int64) for v in  # copies: the OOV fix below writes into them
               workflow.transform(pd.DataFrame({column: [list(s) for s in sessions]}))[column]]
    known = len(vocabulary_ids(workflow, column))
    if item_ids is None or len(item_ids) <= known:
        return encoded
    added = {str(item): i for i, item in enumerate(item_ids) if i >= known}
    for codes, session in zip(encoded, sessions):
        tail = list(session)[len(session) - len(codes):]  # the workflow keeps the session's last L items
        for j, raw in enumerate(tail):
            if codes[j] == OOV and raw in added:
                codes[j] = added[raw]
    return encoded


def reference_unknown_ids(workflow, sessions: Sequence[Sequence[str]], item_ids: np.ndarray, whole: bool = True,
                          column: str = INPUT) -> np.ndarray:
    """What the served `unknown_ids` must hold, int [B]: per session, its raw IDs that `item_ids` (the served
    catalog, index -> raw ID) does not hold; of the whole session (`whole`, the fast transform), else of
    the last L items NVTabular's `Workflow.transform` keeps (OOV there)."""
    if whole:
        served = {str(i) for i in np.asarray(item_ids, dtype=object)[3:].tolist() if str(i)}  # "": no item
        return np.array([sum(str(i) not in served for i in s) for s in sessions], dtype=np.int64)
    return np.array([int(np.sum(np.asarray(codes) == OOV)) for codes in reference_encode(workflow, sessions, item_ids,
                                                                                           column)], dtype=np.int64)


def reference_recommend(model, workflow, item_ids: np.ndarray, sessions: Sequence[Sequence[str]], k: int,
                        column: str = INPUT, rules: dict | None = None, attributes=None) -> tuple[np.ndarray, np.ndarray]:
    """What the served graph must answer: NVTabular's own `Workflow.transform` on the raw sessions,
    then the in-process model's `recommend` on the right-padded [B L] histories (pads 0), mapped to
    raw IDs with `item_ids` (index -> str, e.g. `run_item_ids`): (str object [B k], scores float32 [B k]).
    Slots with no candidate left (every item seen, or fewer than k items) hold "" and -inf.
    rules: {"exclude_ids": raw IDs, "include_ids": raw IDs, "filter": JSON} for every session
    (`reference_item_rules`; a filter needs `attributes`, the RUN's attribute table: data/attributes.py).
    Empty sessions are answered by popularity in serving (see predict.py), not by this function."""
    ids, padded, _, _ = _reference_top_k(model, workflow, item_ids, sessions, k, column, rules, attributes)
    return ids, padded


def reference_filter_mask(attributes, spec) -> np.ndarray:
    """bool [rows]: the rows a (valid) filter allows, by plain pandas comparisons on the attribute table (one
    row per index row): the reference the served AttributeIndex must match."""
    import json
    from datetime import timedelta

    import pandas as pd

    from odmt_t4r.data.attributes import attribute_kind

    spec = json.loads(spec) if isinstance(spec, (str, bytes)) else spec
    mask = pd.Series(True, index=attributes.index)
    for name, cond in spec.items():
        col = attributes[name]
        kind = attribute_kind(col)
        present = col.notna()
        if kind == "date":  # compared as UTC timestamps; a date-only max covers its day
            col = pd.to_datetime(col, utc=True)
        if isinstance(cond, dict) and "not" in cond:
            values = cond["not"] if isinstance(cond["not"], list) else [cond["not"]]
            hit = present & ~col.isin(values)
        elif isinstance(cond, dict):
            hit = present.copy()
            for bound, keep in (("min", lambda c, v: c >= v), ("max", lambda c, v: c <= v)):
                if cond.get(bound) is None:
                    continue
                value = cond[bound]
                if kind == "date":
                    stamp = pd.Timestamp(value)
                    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
                    if bound == "max" and len(value.strip()) == 10:
                        stamp += timedelta(days=1) - timedelta(milliseconds=1)
                    value = stamp
                hit &= keep(col, value).fillna(False).astype(bool)
        else:
            hit = present & col.isin(cond if isinstance(cond, list) else [cond]).fillna(False).astype(bool)
        mask &= hit.fillna(False).astype(bool)
    return mask.to_numpy(dtype=bool)


def reference_item_rules(item_ids: np.ndarray, rules: dict | None, attributes=None):
    """Raw-ID rules -> (retrieval.ItemRules over the RUN's index rows, or None; {"exclude": n, "include": n}
    the IDs `item_ids` does not hold), resolved with a plain dict: independent of the served graph's lookup.
    A "filter" is evaluated on `attributes` (`reference_filter_mask`)."""
    import torch

    from odmt_t4r.model.retrieval import ItemRules

    if not rules:
        return None, {"exclude": 0, "include": 0}
    allow = None
    if rules.get("filter") is not None:
        if attributes is None:
            raise ValueError("a filter needs the RUN's attribute table (data/attributes.py run_attributes)")
        allow = torch.from_numpy(reference_filter_mask(attributes, rules["filter"]))
    index = {str(raw): i for i, raw in enumerate(np.asarray(item_ids, dtype=object).tolist()) if i >= 3 and str(raw)}
    rows, unknown = {}, {}
    for name in ("exclude_ids", "include_ids"):
        ids = rules.get(name)
        unknown[name.split("_")[0]] = 0 if ids is None else sum(str(i) not in index for i in ids)
        rows[name] = None if ids is None else torch.tensor([index[str(i)] for i in ids if str(i) in index],
                                                            dtype=torch.long)
    return ItemRules(exclude=rows["exclude_ids"], include=rows["include_ids"], allow=allow), unknown


def reference_explain(model, workflow, item_ids: np.ndarray, sessions: Sequence[Sequence[str]], k: int,
                      column: str = INPUT) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`reference_recommend`'s answers and what the served `contribution_<branch>` outputs must hold:
    {branch: float32 [B k]} (odmt_t4r/model/explain.py), 0 in padded slots and for empty sessions."""
    import torch

    from odmt_t4r.model.explain import BranchExplainer

    ids, padded, hist, idx = _reference_top_k(model, workflow, item_ids, sessions, k, column)
    explained = np.isfinite(padded) & (hist[:, :1] > 0)
    safe = np.where(explained, idx, 0)
    with torch.inference_mode():
        lifts = BranchExplainer(model).contributions(torch.from_numpy(hist), torch.from_numpy(safe))
    return ids, padded, {b: np.where(explained, v.numpy(), 0.0).astype(np.float32) for b, v in lifts.items()}


def _reference_top_k(model, workflow, item_ids, sessions, k, column, rules=None, attributes=None):
    """(raw IDs [B k], scores [B k], histories [B L], item indices [B k]) of `reference_recommend`."""
    import torch

    encoded = reference_encode(workflow, sessions, item_ids, column)
    L = model.config.max_length
    hist = np.zeros((len(encoded), L), dtype=np.int64)
    for i, v in enumerate(encoded):
        v = np.asarray(v, dtype=np.int64)[-L:]
        hist[i, : len(v)] = v
    with torch.inference_mode():
        scores, idx = model.recommend(torch.from_numpy(hist), k=k,
                                      rules=reference_item_rules(item_ids, rules, attributes)[0])
    scores, idx = scores.numpy(), idx.numpy()
    found = np.isfinite(scores)
    ids = np.full((len(hist), k), "", dtype=object)
    padded = np.full((len(hist), k), -np.inf, dtype=np.float32)
    ids[:, : idx.shape[1]] = np.where(found, np.asarray(item_ids, dtype=object)[idx], "")
    padded[:, : idx.shape[1]] = np.where(found, scores, -np.inf)
    full_idx = np.zeros((len(hist), k), dtype=np.int64)
    full_idx[:, : idx.shape[1]] = idx
    return ids, padded, hist, full_idx


def edge_sessions(vocab: Sequence[str], max_length: int) -> list[list[str]]:
    """Sessions that exercise the request transform and small catalogs: unknown IDs, empty, long,
    repeated, odd strings, and the last `max_length` catalog items (every item of a small catalog,
    so no candidate is left). Works from a one-item vocabulary up."""
    known = [v for v in vocab if v]
    pick = lambda i: known[i % len(known)]  # noqa: E731 - small catalogs repeat items
    long = [pick(i) for i in range(3 * max_length + 1)]
    return [
        ["__unknown__"],
        [pick(0), "__unknown__", pick(1)],
        [],
        long,
        [pick(2)] * 3,
        ["", " ", pick(0).lower(), pick(0) + " ", "nan", "None", "0"],
        [known[-1]],
        ["日本語", pick(3)],
        known[-max_length:],
    ]


def check_in_process(ensemble, predict, workflow, sessions: Sequence[Sequence[str]], atol: float = 1e-4) -> dict:
    """Runs the ensemble graph in-process on `sessions` and compares it with `reference_recommend` on
    an independently loaded (eager) copy of the model, and, for the fast transform, the encoding with
    `Workflow.transform` on every session. Raises ServingCheckError on any difference."""
    from merlin.table import TensorTable

    from odmt_t4r.model import OdmtRecommender

    from triton_models.client import encode_sessions
    from triton_models.graph import graph_chain
    from triton_models.predict import CONTRIBUTION, UNKNOWN_IDS
    from triton_models.vocab_lookup import VocabularyLookup

    column = predict.input_column
    values, offsets = encode_sessions(sessions)
    values = np.array([v.decode("utf-8") for v in values], dtype=object)  # in-process: str, served: bytes
    out = ensemble.transform(TensorTable({f"{column}__values": values, f"{column}__offsets": offsets}))
    got_ids = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(out["item_ids"].values)
    got_scores = out["scores"].values
    reference = OdmtRecommender.from_pretrained(predict.run_dir, data_dir=predict.data_dir)
    item_ids = run_item_ids(predict.run_dir, predict.data_dir)
    want_ids, want_scores, want_lifts = reference_explain(reference, workflow, item_ids, sessions, predict.k, column)
    nonempty = np.array([len(s) > 0 for s in sessions])
    mismatched = [i for i in np.flatnonzero(nonempty) if list(got_ids[i]) != list(want_ids[i])]
    if mismatched:
        i = mismatched[0]
        raise ServingCheckError(f"{len(mismatched)} sessions differ from the in-process model, e.g. session {i}: "
                             f"{got_ids[i][:5].tolist()} vs {want_ids[i][:5].tolist()}")
    got, want = got_scores[nonempty], want_scores[nonempty]
    if not np.array_equal(np.isfinite(got), np.isfinite(want)):
        raise ServingCheckError("the served graph pads other slots (-inf scores) than the in-process model")
    finite = np.isfinite(want)
    diff = float(np.max(np.abs(got[finite] - want[finite]))) if finite.any() else 0.0
    if not diff <= atol:
        raise ServingCheckError(f"scores differ from the in-process model by up to {diff:.3g} (> {atol})")
    if set(predict.optional_outputs) != {CONTRIBUTION + b for b in want_lifts}:
        raise ServingCheckError(f"the graph explains {predict.optional_outputs}, the model's fusion {list(want_lifts)}")
    lift_diff = max((float(np.max(np.abs(out[CONTRIBUTION + b].values[nonempty] - want[nonempty]), initial=0.0))
                     for b, want in want_lifts.items()), default=0.0)
    if not lift_diff <= atol:
        raise ServingCheckError(f"per-branch contributions differ from the in-process model by up to {lift_diff:.3g}")
    encode_checked = 0
    lookups = [n.op for n in graph_chain(ensemble) if isinstance(n.op, VocabularyLookup)]
    want_unknown = reference_unknown_ids(workflow, sessions, item_ids, whole=bool(lookups), column=column)
    got_unknown = np.asarray(out[UNKNOWN_IDS].values).reshape(-1)
    if got_unknown.tolist() != want_unknown.tolist():
        bad = int(np.flatnonzero(got_unknown != want_unknown)[0])
        raise ServingCheckError(f"the served graph counts {got_unknown[bad]} unknown IDs in session {bad}, "
                                f"the served catalog {want_unknown[bad]}: {list(sessions[bad])[:8]}")
    if lookups:
        expected = reference_encode(workflow, sessions, item_ids, column)
        codes, new_offsets = lookups[0].encode(values, offsets)
        for i, want in enumerate(expected):
            got = codes[new_offsets[i]:new_offsets[i + 1]]
            if not np.array_equal(got, np.asarray(want, dtype=np.int64)):
                raise ServingCheckError(f"fast transform != Workflow.transform on session {i}: {got} vs {list(want)}")
            encode_checked += 1
    rules_checked = check_rules(ensemble, predict, workflow, reference, item_ids, sessions, atol)
    return {"sessions": len(sessions), "max_abs_score_diff": diff, "max_abs_contribution_diff": lift_diff,
            "encodings_checked": encode_checked, "unknown_ids_checked": len(sessions),
            "rules_checked": rules_checked, "sequence_encoders": predict.jit_status}


def example_rules(answers: np.ndarray, sessions: Sequence[Sequence[str]], served: Sequence[str]) -> list[dict]:
    """Rules that change the answers of `sessions` (their unrestricted top-k `answers`, raw IDs [B k]): an
    exclude list of the first answers, an include list of later answers, session items and other catalog
    items, and both together; each with an ID the catalog does not hold."""
    firsts = [str(a) for a in answers[:, :3].reshape(-1).tolist() if a]
    later = [str(a) for a in answers[:, 4::2].reshape(-1).tolist() if a]
    others = [str(i) for i in served[:: max(1, len(served) // 7)] if i]
    include = list(dict.fromkeys(later + [i for s in sessions[:3] for i in s][:4] + others))
    return [{"exclude_ids": [*firsts, "__not-an-item__"]},
            {"include_ids": [*include, "__not-an-item__"]},
            {"exclude_ids": firsts[:2], "include_ids": include}]


def example_filter(attributes) -> dict | None:
    """A filter on the first attribute other than new_arrival that leaves some items (None without one): a
    text attribute's two commonest values, a number's or a date's upper half, a flag's true."""
    from odmt_t4r.data.attributes import NEW_ARRIVAL, attribute_kind

    for name in attributes.columns:
        col = attributes[name].dropna()
        if name == NEW_ARRIVAL or col.empty:
            continue
        kind = attribute_kind(col)
        if kind == "text":
            return {name: col.value_counts().index[:2].tolist()}
        if kind == "number":
            return {name: {"min": float(col.median())}}
        if kind == "date":
            return {name: {"min": col.sort_values().iloc[len(col) // 2].isoformat()}}
        return {name: True}
    return None


def check_rules(ensemble, predict, workflow, reference, item_ids, sessions, atol: float) -> int:
    """The graph under `example_rules`, against `reference_recommend` with the same rules; returns how many
    (session, rule) answers were compared. Raises ServingCheckError on any difference."""
    import json

    from merlin.table import TensorTable

    from odmt_t4r.data.attributes import run_attributes
    from triton_models.client import encode_sessions
    from triton_models.predict import UNKNOWN_RULE_IDS

    column = predict.input_column
    sessions = [s for s in sessions if len(s)][:24]  # empty ones are answered by popularity (predict.py)
    values, offsets = encode_sessions(sessions)
    values = np.array([v.decode("utf-8") for v in values], dtype=object)
    served = [str(i) for i in np.asarray(item_ids, dtype=object)[3:].tolist() if str(i)]
    answers = reference_recommend(reference, workflow, item_ids, sessions[:4], predict.k, column)[0]
    attributes = run_attributes(predict.run_dir, predict.data_dir)  # read here, apart from the graph's index
    rules = example_rules(answers, sessions, served)
    spec = example_filter(attributes)
    if spec is not None:
        rules += [{"filter": json.dumps(spec)}, {"filter": json.dumps(spec), "exclude_ids": rules[0]["exclude_ids"]}]
    checked = 0
    for rule in rules:
        predict.rules = [rule] * len(sessions)
        try:
            out = ensemble.transform(TensorTable({f"{column}__values": values, f"{column}__offsets": offsets}))
        finally:
            predict.rules = None
        got = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(out["item_ids"].values)
        want_ids, want_scores = reference_recommend(reference, workflow, item_ids, sessions, predict.k, column, rule,
                                                    attributes)
        if got.tolist() != want_ids.tolist():
            bad = next(i for i in range(len(sessions)) if list(got[i]) != list(want_ids[i]))
            raise ServingCheckError(f"under the rule {sorted(rule)} session {bad} is answered "
                                    f"{got[bad][:5].tolist()}, in-process {want_ids[bad][:5].tolist()}")
        finite = np.isfinite(want_scores)
        diff = float(np.max(np.abs(out["scores"].values[finite] - want_scores[finite]), initial=0.0))
        if not diff <= atol:
            raise ServingCheckError(f"under the rule {sorted(rule)} scores differ from the in-process model by {diff:.3g}")
        counts = reference_item_rules(item_ids, rule, attributes)[1]
        got_counts = np.asarray(out[UNKNOWN_RULE_IDS].values).reshape(-1, 2)
        if not (got_counts == [counts["exclude"], counts["include"]]).all():
            raise ServingCheckError(f"the graph counts {got_counts[0].tolist()} unknown rule IDs, the catalog "
                                    f"{[counts['exclude'], counts['include']]}")
        checked += len(sessions)
    return checked
