"""`odmt recommend`: ask a running Triton server for next-item recommendations, in raw item IDs.

Wire contract of the served model (default name `executor_model`, as merlin-systems exports it):

    inputs   item_id-list__values   BYTES  [N]      raw item IDs (UTF-8) of all sessions, concatenated
             item_id-list__offsets  INT32  [B+1]    session b is values[offsets[b]:offsets[b+1]]; offsets[0]=0
             exclude_ids            BYTES  [E]      optional: raw IDs never returned (every session of the request)
             include_ids            BYTES  [I]      optional: only these raw IDs may be returned
             filter                 BYTES  [1]      optional: one JSON object over the catalog's attributes
    outputs  item_ids               BYTES  [B, K]   raw item IDs, best first; "" marks padding
             scores                 FP32   [B, K]   their scores, descending
             contribution_<branch>  FP32   [B, K]   optional, one per branch in the fused score: computed
                                                    only when requested (`explain`, `odmt recommend --explain`)
             unknown_ids            INT32  [B, 1]   optional: how many of the session's item IDs the served
                                                    catalog does not hold (`recommend_with_unknown`)
             unknown_rule_ids       INT32  [B, 2]   optional: the exclude / include IDs the served catalog does
                                                    not hold (ignored); asked for when rules are sent

The exported executor model uses `max_batch_size: 64` with dynamic batching, so tensors carry a leading batch dimension of 1; `--max-batch-size 0` exports merlin's unbatched shapes, which this client handles too. If a
model declares `max_batch_size > 0`, the client sends the request as one batch entry ([1, N] and
[1, B+1]) and reads outputs of any shape that holds B*K entries. K is fixed by the model; `k`
truncates to it (asking for more than K returns K).

`--explain` asks for the contributions too and names the branch that drove each recommendation: the one
whose weighted score lifts the item most above an average catalog item (odmt_t4r/model/explain.py).

`odmt recommend` also asks for `unknown_ids` when the served model declares it (repositories exported before
it existed do not) and says on stderr when the session holds IDs the served catalog does not know: they
reach the model as one "unknown item" token each, and a session of unknown IDs only gets an answer that
does not depend on its items.

Business rules (`exclude=`, `include=` on every call; `odmt recommend --exclude/--include`, or their `-json`
forms for IDs holding commas): the answer is the unrestricted ranking with the excluded items removed, or
restricted to the included ones (same items, order and scores); an include list leaving fewer than k items
gets fewer. Unknown IDs in them are ignored; the `*_with_unknown` calls count them in `unknown_rule_ids`.
`filter=` (a dict or JSON text; `odmt recommend --filter JSON`) keeps the items whose catalog attributes match
(grammar: odmt_t4r/model/item_filter.py, docs/operations.md#attribute-filters-filter-and-new-arrivals);
`--new-arrivals [--since DATE]` is the filter {"new_arrival": true} (the items `odmt add-items` added after
training), or {"since": {"min": DATE}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from dataclasses import dataclass

import numpy as np

from odmt_t4r.contract import ITEM_LIST as INPUT  # noqa: E402
OUTPUTS = ("item_ids", "scores")
CONTRIBUTION = "contribution_"  # + branch name (triton_models/predict.py)
POPULARITY = "popularity"  # odmt_t4r.model.explain.POPULARITY, kept here so the client needs no torch
UNKNOWN_IDS = "unknown_ids"  # triton_models.predict.UNKNOWN_IDS: per session, its IDs not in the served catalog
EXCLUDE_IDS, INCLUDE_IDS = RULE_INPUTS = ("exclude_ids", "include_ids")  # triton_models.predict.RULE_INPUTS
FILTER = "filter"  # triton_models.predict.FILTER: the optional attribute filter, one JSON text per request
NEW_ARRIVAL, SINCE = "new_arrival", "since"  # odmt_t4r.data.attributes: the new-arrivals shelf's attributes
UNKNOWN_RULE_IDS = "unknown_rule_ids"  # triton_models.predict.UNKNOWN_RULE_IDS: [B, 2] unknown exclude / include IDs


@dataclass
class Explained:
    """One recommended item with its per-branch contributions and the branch that drove it."""

    item_id: str
    score: float
    contributions: dict[str, float]  # {branch: weighted lift over an average catalog item}
    drove: str  # the branch with the largest contribution; "popularity" for an empty session

    def as_json(self) -> dict:
        return {"item_id": self.item_id, "score": self.score, "drove": self.drove,
                "contributions": self.contributions}


def encode_sessions(sessions: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged sessions -> (values object array of UTF-8 bytes, INT32 offsets of length B+1)."""
    values = np.array([str(item).encode("utf-8") for s in sessions for item in s], dtype=np.object_)
    offsets = np.zeros(len(sessions) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(s) for s in sessions])
    return values, offsets


def decode_topk(ids: np.ndarray, scores: np.ndarray, batch: int, k: int) -> list[list[tuple[str, float]]]:
    ids, scores = ids.reshape(batch, -1), scores.reshape(batch, -1)  # tolerate a leading batch dim
    out = []
    for row_ids, row_scores in zip(ids, scores):
        pairs = [(i.decode("utf-8") if isinstance(i, bytes) else str(i), float(s)) for i, s in zip(row_ids, row_scores)]
        out.append([p for p in pairs if p[0]][:k])  # "" is padding
    return out


def _unknown(arrays: list[np.ndarray], counted: bool, batch: int) -> list[int] | None:
    """The `unknown_ids` output (asked for last) as one int per session, or None when not asked for."""
    return [int(n) for n in arrays[-1].reshape(batch, -1)[:, 0]] if counted else None


def rule_lists(exclude: Sequence[str] | None, include: Sequence[str] | None, filter: dict | str | None = None) -> dict:
    """{input name: raw IDs, or [the filter's JSON text]} of the rules given (None: no such rule; an empty
    include allows nothing)."""
    rules = {} if filter is None else {FILTER: [filter if isinstance(filter, str) else json.dumps(filter)]}
    for name, ids in ((EXCLUDE_IDS, exclude), (INCLUDE_IDS, include)):
        if ids is None:
            continue
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"{name.split('_')[0]} must be a list of item IDs, not one string")
        rules[name] = [str(i) for i in ids]
    return rules


def unknown_note(session_number: int, unknown: int, length: int) -> str | None:
    """The stderr note for a session holding IDs the served catalog does not know, or None."""
    if unknown <= 0:
        return None
    line = f"odmt recommend: note: session {session_number}: {unknown} of {length} item IDs are not in the served catalog"
    if unknown >= length:
        return line + "; none is known, so the answer is not personalised (any session of that many unknown IDs gets it)"
    return line + " (each reaches the model as an unknown-item token)"


class RecommenderClient:
    """Recommendations from a Triton-served session model, over HTTP or gRPC."""

    def __init__(self, url: str, protocol: str = "http", model_name: str = "executor_model", *,
                 timeout: float = 30.0, input_name: str = INPUT, outputs: tuple[str, str] = OUTPUTS):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        self.url = url.split("://", 1)[-1].rstrip("/")  # tritonclient wants host:port, no scheme
        self.protocol, self.model_name, self.timeout = protocol, model_name, timeout
        self.input_name, self.outputs = input_name, outputs
        self._max_batch_size: int | None = None
        self._output_names: list[str] | None = None
        self._input_names: list[str] | None = None
        self.unknown_rule_ids: dict[str, int] | None = None  # the last `*_with_unknown` call's, when it sent rules
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(self.url)
        self._tc = tc

    def _kw(self) -> dict:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}  # http sets it per client

    def is_ready(self) -> bool:
        """True when the server is live and the model ready; raises when the server is unreachable."""
        return bool(self._client.is_server_live(**self._kw())
                    and self._client.is_model_ready(self.model_name, **self._kw()))

    @property
    def max_batch_size(self) -> int:
        if self._max_batch_size is None:
            extra = {"as_json": True, **self._kw()} if self.protocol == "grpc" else {}
            config = self._client.get_model_config(self.model_name, **extra)
            config = config.get("config", config)  # gRPC wraps the config, HTTP does not
            self._max_batch_size = int(config.get("max_batch_size", 0) or 0)
        return self._max_batch_size

    def _input(self, name: str, array: np.ndarray, datatype: str):
        array = array[None] if self.max_batch_size > 0 else array  # the request is one batch entry
        tensor = self._tc.InferInput(name, list(array.shape), datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    @property
    def output_names(self) -> list[str]:
        """The outputs the served model declares (its metadata), in order."""
        if self._output_names is None:
            self._read_metadata()
        return self._output_names

    @property
    def input_names(self) -> list[str]:
        """The inputs the served model declares (its metadata), in order."""
        if self._input_names is None:
            self._read_metadata()
        return self._input_names

    def _read_metadata(self) -> None:
        extra = {"as_json": True, **self._kw()} if self.protocol == "grpc" else {}
        metadata = self._client.get_model_metadata(self.model_name, **extra)
        self._output_names = [o["name"] for o in metadata.get("outputs", [])]
        self._input_names = [i["name"] for i in metadata.get("inputs", [])]

    @property
    def takes_rules(self) -> bool:
        """Whether the served model has the business-rule inputs (repositories exported before them have not)."""
        return set(RULE_INPUTS) <= set(self.input_names)

    @property
    def takes_filter(self) -> bool:
        """Whether the served model has the `filter` input (repositories exported before it have not)."""
        return FILTER in self.input_names

    @property
    def branches(self) -> list[str]:
        """The branches the served model explains (its `contribution_<branch>` outputs), in model order."""
        return [n[len(CONTRIBUTION):] for n in self.output_names if n.startswith(CONTRIBUTION)]

    @property
    def counts_unknown(self) -> bool:
        """Whether the served model has the `unknown_ids` output (repositories exported before it have not)."""
        return UNKNOWN_IDS in self.output_names

    def _requested(self, names: Sequence[str]):
        if self.protocol == "http":
            return [self._tc.InferRequestedOutput(name, binary_data=True) for name in names]
        return [self._tc.InferRequestedOutput(name) for name in names]

    def _infer_raw(self, sessions: Sequence[Sequence[str]], k: int, names: Sequence[str],
                   rules: dict | None = None) -> list[np.ndarray] | None:
        if k < 1:
            raise ValueError("k must be >= 1")
        if isinstance(sessions, str) or any(isinstance(s, str) for s in sessions):
            raise TypeError("sessions must be a list of lists of item IDs")
        if not sessions:
            return None
        if rules and not self.takes_rules:
            raise ValueError(f"model {self.model_name!r} takes no exclude_ids / include_ids inputs: export the RUN "
                             "again with this version of odmt to use business rules")
        if rules and FILTER in rules and not self.takes_filter:
            raise ValueError(f"model {self.model_name!r} takes no filter input: export the RUN again with this "
                             "version of odmt to filter on catalog attributes")
        values, offsets = encode_sessions(sessions)
        inputs = [self._input(f"{self.input_name}__values", values, "BYTES"),
                  self._input(f"{self.input_name}__offsets", offsets, "INT32")]
        for name, ids in (rules or {}).items():
            inputs.append(self._input(name, np.array([i.encode("utf-8") for i in ids], dtype=np.object_), "BYTES"))
        result = self._client.infer(self.model_name, inputs, outputs=self._requested(names), **self._kw())
        return [result.as_numpy(name) for name in names]

    def recommend(self, sessions: Sequence[Sequence[str]], k: int = 10, *, exclude: Sequence[str] | None = None,
                  include: Sequence[str] | None = None, filter: dict | str | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per session, best first; sessions and results are raw item IDs.
        exclude / include / filter: business rules for every session of the call (raw IDs, an attribute filter;
        see the module docstring). Asks for `item_ids` and `scores` only: the server computes no explanations."""
        arrays = self._infer(sessions, k, self.outputs, rule_lists(exclude, include, filter))
        return [] if arrays is None else decode_topk(*arrays, len(sessions), k)

    def recommend_with_unknown(self, sessions: Sequence[Sequence[str]], k: int = 10, *,
                               exclude: Sequence[str] | None = None, include: Sequence[str] | None = None,
                               filter: dict | str | None = None) -> tuple[list[list[tuple[str, float]]], list[int] | None]:
        """`recommend`'s answers and, per session, how many of its item IDs the served catalog does not hold
        (None when the served model has no `unknown_ids` output: a repository exported before it). With rules,
        `unknown_rule_ids` then holds how many of their IDs the served catalog does not hold."""
        counted = self.counts_unknown
        arrays = self._infer(sessions, k, [*self.outputs, *([UNKNOWN_IDS] if counted else [])],
                             rule_lists(exclude, include, filter), count_rules=True)
        if arrays is None:
            return [], ([] if counted else None)
        return decode_topk(arrays[0], arrays[1], len(sessions), k), _unknown(arrays, counted, len(sessions))

    def _infer(self, sessions, k, names, rules: dict | None = None, count_rules: bool = False):
        """The call; with rules and `count_rules`, also `unknown_rule_ids` (read off the end of the outputs
        into `self.unknown_rule_ids`: the request's, the same for each of its sessions)."""
        self.unknown_rule_ids = None
        counting = bool(rules) and count_rules and UNKNOWN_RULE_IDS in self.output_names
        arrays = self._infer_raw(sessions, k, [*names, *([UNKNOWN_RULE_IDS] if counting else [])], rules)
        if arrays is not None:  # the served K: the outputs are [B, K] whatever k a request asks for
            self.served_k = int(arrays[0].reshape(len(sessions), -1).shape[1])
            if counting:
                counts = arrays.pop().reshape(len(sessions), 2)[0]
                self.unknown_rule_ids = {"exclude": int(counts[0]), "include": int(counts[1])}
        return arrays

    def explain(self, sessions: Sequence[Sequence[str]], k: int = 10, *, exclude: Sequence[str] | None = None,
                include: Sequence[str] | None = None, filter: dict | str | None = None) -> list[list[Explained]]:
        """`recommend`'s answers with each item's per-branch contributions and the branch that drove it."""
        return self._explain(sessions, k, False, rule_lists(exclude, include, filter))[0]

    def explain_with_unknown(self, sessions: Sequence[Sequence[str]], k: int = 10, *,
                             exclude: Sequence[str] | None = None, include: Sequence[str] | None = None,
                             filter: dict | str | None = None) -> tuple[list[list[Explained]], list[int] | None]:
        """`explain`'s answers and the `unknown_ids` counts of `recommend_with_unknown`."""
        return self._explain(sessions, k, self.counts_unknown, rule_lists(exclude, include, filter))

    def _explain(self, sessions, k: int, counted: bool, rules: dict) -> tuple[list[list[Explained]], list[int] | None]:
        branches = self.branches
        if not branches:
            raise ValueError(f"model {self.model_name!r} has no per-branch outputs ({CONTRIBUTION}<branch>): "
                             "export the RUN again with this version of odmt")
        arrays = self._infer(sessions, k, [*self.outputs, *(CONTRIBUTION + b for b in branches),
                                           *([UNKNOWN_IDS] if counted else [])], rules, count_rules=counted)
        if arrays is None:
            return [], ([] if counted else None)
        B = len(sessions)
        unknown = _unknown(arrays, counted, B)
        lifts = [a.reshape(B, -1) for a in arrays[2:2 + len(branches)]]
        out = []
        for row, (session, recs) in enumerate(zip(sessions, decode_topk(arrays[0], arrays[1], B, k))):
            items = []
            for j, (item, score) in enumerate(recs):  # padding is at the end: slot j is recs[j]
                parts = {b: float(v[row, j]) for b, v in zip(branches, lifts)}
                drove = max(parts, key=parts.get) if session else POPULARITY  # max: the first on ties
                items.append(Explained(item, score, parts, drove))
            out.append(items)
        return out, unknown

    def close(self) -> None:
        self._client.close()  # frees the keep-alive connection a server shutdown would wait for

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- CLI ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT of the server (HTTP or gRPC port)")
    session = parser.add_mutually_exclusive_group(required=True)
    session.add_argument("--items", help="the session: comma-separated raw item IDs, oldest first, taken exactly "
                                         "as written (no spaces around the commas)")
    session.add_argument("--items-json", help='the session as a JSON list of raw item IDs, e.g. \'["a,b", " 7"]\' '
                                              "(for IDs holding commas)")
    for rule, what in (("exclude", "never recommend these items"), ("include", "recommend only among these items")):
        group = parser.add_mutually_exclusive_group()
        group.add_argument(f"--{rule}", metavar="ID,ID,...", help=f"{what}: comma-separated raw item IDs (IDs the "
                                                                   "served catalog does not hold are ignored and counted)")
        group.add_argument(f"--{rule}-json", metavar="JSON", help=f"--{rule} as a JSON list of raw item IDs, for IDs "
                                                                  "holding commas")
    parser.add_argument("--filter", metavar="JSON", help='only items whose catalog attributes match, e.g. '
                        '\'{"category": ["dress", "coat"], "price": {"max": 80}}\' (docs/operations.md: Attribute filters)')
    parser.add_argument("--new-arrivals", action="store_true", help="only the items `odmt add-items` added after "
                        "the model was trained; with --since DATE: only the items whose since is DATE or later")
    parser.add_argument("--since", metavar="DATE", help="with --new-arrivals: the first arrival date (ISO 8601)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", default="executor_model")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print [[item_id, score], ...] as JSON (with --explain: "
                                                             "[{item_id, score, drove, contributions}, ...])")
    parser.add_argument("--explain", action="store_true",
                        help="also print which branch (id/text/image) drove each recommendation, and each branch's "
                             "contribution: its weighted score of the item above an average catalog item's")


def format_recommendations(recs: list[tuple[str, float]]) -> str:
    width = max([len("item_id")] + [len(i) for i, _ in recs])
    lines = [f"{'rank':>4}  {'item_id':<{width}}  score"]
    lines += [f"{rank:>4}  {item:<{width}}  {score:.4f}" for rank, (item, score) in enumerate(recs, 1)]
    return "\n".join(lines)


def format_explained(recs: list[Explained], branches: list[str]) -> str:
    width = max([len("item_id")] + [len(r.item_id) for r in recs])
    drove = max([len("drove")] + [len(r.drove) for r in recs])
    cols = [max(10, len(b)) for b in branches]
    head = "  ".join(f"{b:>{c}}" for b, c in zip(branches, cols))
    lines = [f"{'rank':>4}  {'item_id':<{width}}  {'score':>9}  {'drove':<{drove}}  {head}"]
    for rank, r in enumerate(recs, 1):
        parts = "  ".join(f"{r.contributions[b]:>{c}.4f}" for b, c in zip(branches, cols))
        lines.append(f"{rank:>4}  {r.item_id:<{width}}  {r.score:>9.4f}  {r.drove:<{drove}}  {parts}")
    lines.append("drove: the branch whose weighted score lifts the item most above an average catalog item; "
                 "the columns are each branch's lift")
    return "\n".join(lines)


def id_list(flag: str, text: str | None, json_text: str | None) -> list[str] | None:
    """A list of raw IDs from `--flag a,b,c` or `--flag-json '["a,b", " 7"]'`, exactly as written (IDs are
    strings: no trimming, no number conversion); None when neither is given."""
    if json_text is not None:
        try:
            items = json.loads(json_text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--{flag}-json is not valid JSON ({exc})") from exc
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"--{flag}-json must be a JSON list of strings")
        return items
    return None if text is None else [i for i in text.split(",") if i != ""]


def session_items(args: argparse.Namespace) -> list[str]:
    """The session's raw IDs exactly as given."""
    items = id_list("items", args.items, args.items_json)
    if not items:
        raise ValueError("the session is empty: give at least one item ID")
    return items


def rule_items(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """(--exclude IDs, --include IDs) as given, None where the flag is absent; an empty list is refused."""
    out = []
    for rule in ("exclude", "include"):
        ids = id_list(rule, getattr(args, rule, None), getattr(args, f"{rule}_json", None))
        if ids is not None and not ids:
            raise ValueError(f"--{rule} holds no item IDs: give at least one, or leave --{rule} out")
        out.append(ids)
    return out[0], out[1]


def rule_filter(args: argparse.Namespace) -> dict | None:
    """--filter JSON, and --new-arrivals [--since DATE] as its filter, ANDed (None: neither given)."""
    spec = None
    if getattr(args, "filter", None) is not None:
        try:
            spec = json.loads(args.filter)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--filter is not valid JSON ({exc})") from exc
        if not isinstance(spec, dict):
            raise ValueError('--filter must be a JSON object, e.g. \'{"category": ["dress"]}\'')
    since = getattr(args, "since", None)
    if since is not None and not getattr(args, "new_arrivals", False):
        raise ValueError("--since applies to --new-arrivals: give both")
    if getattr(args, "new_arrivals", False):
        shelf = {SINCE: {"min": since}} if since is not None else {NEW_ARRIVAL: True}
        clash = set(shelf) & set(spec or {})
        if clash:
            raise ValueError(f"--filter already names {sorted(clash)[0]!r}, which --new-arrivals sets: give one of them")
        spec = {**(spec or {}), **shelf}
    return spec


def rule_notes(unknown: dict[str, int] | None, exclude: list[str] | None, include: list[str] | None) -> list[str]:
    """The stderr notes for rule IDs the served catalog does not hold (they were ignored)."""
    notes = []
    for rule, ids in (("exclude", exclude), ("include", include)):
        n = (unknown or {}).get(rule, 0)
        if ids and n:
            notes.append(f"odmt recommend: note: {n} of {len(ids)} --{rule} item IDs are not in the served catalog "
                         "(ignored)")
    return notes


def served_capability(args: argparse.Namespace, read, part: str, lacking: str, flags: str):
    """What `read()` says the served model offers (from its metadata); a ValueError naming the way out when
    the metadata cannot be read or the model lacks it (a repository exported before `flags` existed)."""
    try:
        offered = read()
    except Exception as exc:
        raise ValueError(f"cannot read model {args.model!r}'s {part}: {exc}") from exc
    if not offered:
        raise ValueError(f"model {args.model!r} on {args.url} {lacking}: export the RUN again with this version "
                         f"of odmt to use {flags}")
    return offered


def run(args: argparse.Namespace) -> int:
    items = session_items(args)
    exclude, include = rule_items(args)
    spec = rule_filter(args)
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    try:
        client = RecommenderClient(args.url, args.protocol, args.model, timeout=args.timeout)
    except Exception as exc:  # e.g. a malformed URL
        raise ValueError(f"cannot create a {args.protocol} client for {args.url}: {exc}") from exc
    with client:
        try:
            ready = client.is_ready()
        except Exception as exc:
            raise ConnectionError(f"cannot reach a Triton server at {args.url} over {args.protocol}: {exc}") from exc
        if not ready:
            raise ConnectionError(f"model {args.model!r} is not ready on {args.url}")
        if args.explain:
            branches = served_capability(args, lambda: client.branches, "outputs", "serves no per-branch outputs",
                                         "--explain")
        if exclude is not None or include is not None:
            served_capability(args, lambda: client.takes_rules, "inputs", "takes no business rules",
                              "--exclude / --include")
        if spec is not None:
            served_capability(args, lambda: client.takes_filter, "inputs", "takes no attribute filter",
                              "--filter / --new-arrivals")
        try:
            answer = client.explain_with_unknown if args.explain else client.recommend_with_unknown
            answers, unknown = answer([items], k=args.k, exclude=exclude, include=include, filter=spec)
            recs = answers[0]
        except Exception as exc:
            raise ValueError(f"inference failed: {exc}") from exc
    note = unknown_note(1, unknown[0], len(items)) if unknown else None
    empty = spec is not None and not any((r.item_id if args.explain else r[0]) for r in recs)
    shelf = ["odmt recommend: note: no unseen item of the served catalog matches the filter" + (
        " (--new-arrivals without --since: items `odmt add-items` added after training; none yet?)"
        if spec.get(NEW_ARRIVAL) else "")] if empty else []
    for line in [*([note] if note else []), *rule_notes(client.unknown_rule_ids, exclude, include), *shelf]:
        print(line, file=sys.stderr)
    served_k = getattr(client, "served_k", None)
    if served_k is not None and served_k < args.k:
        print(f"odmt recommend: note: the server answers at most {served_k} items per session (the repository was "
              f"exported with k={served_k}); export the RUN again with --k {args.k} for more", file=sys.stderr)
    if args.explain:
        print(json.dumps([r.as_json() for r in recs], ensure_ascii=False) if args.json
              else format_explained(recs, branches))
        return 0
    recs = [(item, score) for item, score in recs if item != ""]  # padding of a catalog smaller than k
    print(json.dumps(recs, ensure_ascii=False) if args.json else format_recommendations(recs))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m triton_models.client` = `odmt recommend`."""
    from odmt_t4r.cli import main as odmt_main
    return odmt_main(["recommend", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
