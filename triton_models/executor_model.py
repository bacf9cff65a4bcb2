"""Triton python-backend entry point of the exported `executor_model`: merlin-systems' executor model,
but one graph run per dynamic batch instead of one per request.

merlin-systems 23.08's executor (merlin/systems/triton/models/executor_model.py) wraps `execute` in
`triton_multi_request`, which runs the whole graph once per request even when Triton's dynamic batcher
hands it several, and it reads inputs as if `max_batch_size` were 0. This subclass keeps its
`initialize` (Ensemble.load + every operator's load_artifacts) and replaces `execute`:

  * each request is one batch entry ([1, N] values, [1, B+1] offsets, `max_batch_size > 0`), or the
    whole tensors when the model is exported with `max_batch_size: 0`;
  * the sessions of all requests are concatenated into one TensorTable and the ensemble runs once
    (one Categorify lookup, one model forward for every session of the batch), in groups of at most
    `max_sessions_per_run` sessions (a config parameter) so memory stays bounded;
  * the output rows are split back per request; a request that fails validation gets its own error
    response and does not fail the others. If the merged run raises, each request is retried alone so
    the error lands on the request that caused it;
  * optional outputs (an operator's `optional_outputs`, e.g. OdmtPredict's per-branch contributions) are
    computed only when a request of the run asked for them: the operator's `requested` is set to the
    union of the requests' `requested_output_names()` before each run, and each response holds just what
    its request asked for. (A request that names no outputs asks for all of them, as Triton defines it.)
  * business rules: an operator's `rule_inputs` (OdmtPredict: `exclude_ids`, `include_ids`, `filter`) are
    optional inputs of one flat list per request (raw IDs, [1, N]; a filter: one JSON text, [1, 1]); the
    operator's `check_rules` refuses a malformed one for that request alone. They are read here, not through
    the merlin graph, and handed to the operator as `rules`, one {input: IDs} per session (a request's sessions
    share its dict), or None when no request of the run sent any: a run without rules sets one attribute.

  * availability: REPO/availability.json (triton_models/availability.py, `odmt availability`) names the items
    that may not be served. Every execute looks at its stamp (one stat) and reads it again when it changed, and
    the rule takers get it as `availability` before the run: a change applies from the next request on, with no
    reload of the model.

export.py copies this file into the model repository as executor_model/1/model.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from merlin.dag import postorder_iter_nodes
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.conversions import tensor_names
from merlin.systems.triton.models.executor_model import TritonPythonModel as MerlinExecutorModel
from merlin.table import TensorTable

MAX_SESSIONS_PER_RUN = 256  # default; the model config parameter `max_sessions_per_run` overrides it


AVAILABILITY = "availability.json"  # triton_models.availability.AVAILABILITY, at the repository's root


def deserialize_bytes_tensor(encoded) -> np.ndarray:
    """triton_python_backend_utils.deserialize_bytes_tensor, fast: a BYTES tensor's wire form (a 4-byte little-endian
    length, then the bytes, per element) -> a 1-D object array of bytes. The stub's own version unpacks each
    element with a freshly formatted struct string (about 0.6 µs per element), which made a 500,000-ID
    `exclude_ids` list cost 300 ms; IDs of one width (the common case) are cut with numpy in one pass."""
    data = bytes(encoded)
    if len(data) >= 4:
        width = int.from_bytes(data[:4], "little")
        if width and len(data) % (4 + width) == 0:
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4 + width)
            # every element that width, none ending in NUL (numpy's S type would strip it)
            if (np.ascontiguousarray(rows[:, :4]).view("<u4").ravel() == width).all() and rows[:, -1].all():
                return np.ascontiguousarray(rows[:, 4:]).view(f"S{width}").ravel().astype(object)
    items, at, size_of = [], 0, int.from_bytes
    while at < len(data):
        size = size_of(data[at:at + 4], "little")
        items.append(data[at + 4:at + 4 + size])
        at += 4 + size
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


class RequestError(ValueError):
    """A request the model cannot run (bad offsets, ...): answered with an error, the batch goes on."""


class Availability:
    """The repository's availability file, read again whenever its stamp changes: (sequence, unavailable raw
    IDs as UTF-8 bytes, or None when every item is available). An unreadable file keeps the last state read."""

    def __init__(self, path: Path):
        self.path, self.stamp, self.state = path, None, (0, None)

    def current(self) -> tuple[int, np.ndarray | None]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self.stamp:
            try:
                if stamp is None:
                    self.state = (0, None)
                else:
                    data = json.loads(Path(self.path).read_text())
                    ids = np.array([str(i).encode("utf-8") for i in data["unavailable"]], dtype=object)
                    self.state = (int(data["sequence"]), ids if len(ids) else None)
                self.stamp = stamp
            except (OSError, ValueError, KeyError, TypeError) as exc:  # written atomically: should not happen
                print(f"executor_model: cannot read {self.path} ({exc}); keeping the previous availability",
                      file=sys.stderr, flush=True)
        return self.state


class TritonPythonModel(MerlinExecutorModel):
    def initialize(self, args):
        # the stub converts every BYTES input through this module function: use the fast one (see above)
        pb_utils.deserialize_bytes_tensor = deserialize_bytes_tensor
        super().initialize(args)
        config = json.loads(args["model_config"])
        self.batched = int(config.get("max_batch_size", 0) or 0) > 0
        param = config.get("parameters", {}).get("max_sessions_per_run", {}).get("string_value")
        self.max_sessions = int(param or MAX_SESSIONS_PER_RUN)
        self.runtime = TritonExecutorRuntime()
        schema = self.ensemble.input_schema
        self.ragged = [c for c, s in schema.column_schemas.items() if s.is_ragged]
        self.fixed = [c for c, s in schema.column_schemas.items() if not s.is_ragged]
        self.outputs = self.ensemble.output_schema
        # what config.pbtxt declares: a version added to an older repository (add-items) may compute outputs
        # (e.g. unknown_ids) its config does not declare; Triton 2.51 drops them, a stricter server may refuse them
        declared = {o["name"] for o in config.get("output", [])}
        self.output_names = [n for n in tensor_names(self.outputs) if not declared or n in declared]
        bad = [c for c, s in self.outputs.column_schemas.items() if s.is_ragged]
        if bad:
            raise pb_utils.TritonModelException(f"ragged outputs are not supported by this executor: {bad}")
        # operators whose optional outputs are skipped unless asked for (duck-typed: ops are pickled by value)
        ops = [n.op for n in postorder_iter_nodes(self.ensemble.graph.output_node)]
        self.explainers = [op for op in ops if getattr(op, "optional_outputs", None)]
        # operators that take per-request rules, and the rule inputs config.pbtxt declares (older repositories:
        # none, and Triton refuses a request that sends an undeclared input)
        self.rule_takers = [op for op in ops if getattr(op, "rule_inputs", None)]
        inputs = {i["name"] for i in config.get("input", [])}
        self.rule_inputs = list(dict.fromkeys(n for op in self.rule_takers for n in op.rule_inputs if n in inputs))
        # the repository's root: Triton passes the model's folder, or (newer servers) its model.py, as
        # merlin's _parse_model_repository (merlin/systems/triton/models/executor_model.py) reads it
        where = Path(args["model_repository"])
        self.availability = Availability((where.parents[2] if where.suffix == ".py" else where.parent) / AVAILABILITY)

    # -- reading one request ---------------------------------------------------------------------
    def _tensor(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"missing input tensor {name!r}")
        array = tensor.as_numpy()
        if self.batched:
            if array.ndim < 1 or array.shape[0] != 1:
                raise RequestError(f"{name}: send one batch entry per request (shape [1, ...]), got {list(array.shape)}")
            array = array[0]
        return array

    def _rules(self, request) -> dict | None:
        """One request's rule inputs that it sent -> {input: raw IDs [N]}, or None when it sent none. Rules an
        operator cannot run (a malformed filter) are a RequestError: that request alone is refused."""
        rules = {}
        for name in self.rule_inputs:
            if pb_utils.get_input_tensor_by_name(request, name) is not None:
                rules[name] = self._tensor(request, name).reshape(-1)
        for op in self.rule_takers if rules else ():
            try:
                getattr(op, "check_rules", lambda _: None)(rules)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
        return rules or None

    def _read(self, request) -> tuple[dict, int]:
        """One request -> ({column: values or (values, offsets)}, number of sessions)."""
        columns, rows = {}, None
        for col in self.ragged:
            values = self._tensor(request, f"{col}__values").reshape(-1)
            offsets = self._tensor(request, f"{col}__offsets").reshape(-1).astype(np.int64)
            if (offsets.size == 0 or offsets[0] != 0 or offsets[-1] != values.size
                    or np.any(offsets[1:] < offsets[:-1])):
                raise RequestError(f"{col}__offsets must hold B+1 non-decreasing entries from 0 to the number of "
                                   f"values ({values.size}); got {offsets[:8].tolist()}"
                                   f"{'...' if offsets.size > 8 else ''} ({offsets.size} entries)")
            columns[col] = (values, offsets)
            n = offsets.size - 1
            if rows is not None and n != rows:
                raise RequestError(f"inputs disagree on the number of sessions ({rows} vs {n})")
            rows = n
        for col in self.fixed:
            values = self._tensor(request, col)
            columns[col] = values
            if rows is not None and values.shape[0] != rows:
                raise RequestError(f"inputs disagree on the number of rows ({rows} vs {values.shape[0]})")
            rows = values.shape[0]
        return columns, int(rows or 0)

    # -- one graph run for many requests ---------------------------------------------------------
    def _merge(self, parts: list[dict]) -> TensorTable:
        tensors = {}
        for col in self.ragged:
            values = [p[col][0] for p in parts]
            offsets, shift = [np.zeros(1, dtype=np.int64)], 0
            for p in parts:
                offsets.append(p[col][1][1:] + shift)
                shift += p[col][1][-1]
            tensors[f"{col}__values"] = np.concatenate(values) if len(values) > 1 else values[0]
            tensors[f"{col}__offsets"] = np.concatenate(offsets).astype(np.int32)
        for col in self.fixed:
            tensors[col] = np.concatenate([p[col] for p in parts])
        return TensorTable(tensors)

    def _empty_outputs(self) -> dict:
        out = {}
        for name, col in self.outputs.column_schemas.items():
            dims = [d.max if d.is_fixed else 0 for d in col.shape.dims[1:]] if col.shape.dims else []
            out[name] = np.zeros([0, *dims], dtype=col.dtype.to_numpy)
        return out

    def _run(self, parts: list[dict], rows: list[int], wanted: list[set], rules: list) -> list[dict]:
        """Runs the graph once on the merged sessions and splits its outputs back per request, each
        request getting the outputs it asked for (`wanted`); optional ones run only if one asked.
        rules: each request's rule inputs (None: it sent none), handed to the operators per session."""
        asked = frozenset().union(*wanted)
        for op in self.explainers:
            op.requested = asked
        per_session = None
        if any(r is not None for r in rules):
            per_session = [r for r, n in zip(rules, rows) for _ in range(n)]
        for op in self.rule_takers:
            op.rules = per_session
        if sum(rows) == 0:
            outputs = self._empty_outputs()
        else:
            table = self.ensemble.transform(self._merge(parts), runtime=self.runtime)
            outputs = table.to_dict()
        names = [n for n in self.output_names if n in asked]
        bounds = np.cumsum([0, *rows])
        return [{n: outputs[n][a:b] for n in names if n in w} for a, b, w in zip(bounds[:-1], bounds[1:], wanted)]

    def _response(self, outputs: dict):
        tensors = []
        for name, array in outputs.items():
            array = np.ascontiguousarray(array[None] if self.batched else array)
            tensors.append(pb_utils.Tensor(name, array))
        return pb_utils.InferenceResponse(tensors)

    @staticmethod
    def _error(message: str, invalid_request: bool = False):
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_request else None
        error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)  # INVALID_ARG: HTTP 400, else 500

    def execute(self, requests):
        responses = [None] * len(requests)
        pending = []  # (request position, its columns, its number of sessions, the outputs it asked for, its rules)
        for i, request in enumerate(requests):
            try:
                columns, n = self._read(request)
                rules = self._rules(request) if self.rule_inputs else None
            except RequestError as exc:
                responses[i] = self._error(str(exc), invalid_request=True)
                continue
            asked = set(request.requested_output_names()) or set(self.output_names)  # none named: all
            pending.append((i, columns, n, asked, rules))
        availability = self.availability.current()  # after the requests arrived: a change acknowledged before applies
        for op in self.rule_takers:
            op.availability = availability
        for group in self._groups(pending):
            self._answer(group, responses)
        return responses

    def _groups(self, pending):
        """Consecutive requests with at most `max_sessions` sessions together (a bigger one runs alone),
        so a batch of large requests does not build one huge score matrix."""
        group, size = [], 0
        for item in pending:
            if group and size + item[2] > self.max_sessions:
                yield group
                group, size = [], 0
            group.append(item)
            size += item[2]
        if group:
            yield group

    def _answer(self, group, responses) -> None:
        parts, rows, wanted, rules = ([g[j] for g in group] for j in (1, 2, 3, 4))
        try:
            results = self._run(parts, rows, wanted, rules)
        except Exception:  # noqa: BLE001 - find the request that failed, answer the others
            results = []
            for part, n, w, r in zip(parts, rows, wanted, rules):
                try:
                    results.append(self._run([part], [n], [w], [r])[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
        for (i, *_), result in zip(group, results):
            if isinstance(result, Exception):
                responses[i] = self._error(f"{type(result).__name__}: {result}",
                                           invalid_request=isinstance(result, RequestError))
            else:
                responses[i] = self._response(result)
