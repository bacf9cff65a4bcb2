"""The served graph: a RUN and its prepared DIR's inference workflow -> a merlin-systems Ensemble.

    item_id-list (raw IDs)                                          <- request
      fast:     >> VocabularyLookup(the fitted inference workflow's vocabulary and slice)
      workflow: >> TransformWorkflow(DIR/workflows/inference)   (a second Triton model, called via BLS)
      >> OdmtPredict(RUN, k)                          -> item_ids, scores, unknown_ids [, contribution_<branch>]

`fast` (default) runs the fitted Categorify vocabulary as a dict lookup inside the executor (no pandas,
no second model); `workflow` runs the saved NVTabular workflow itself. A RUN written by `odmt add-items`
indexes items the workflow's vocabulary does not know: its graph is the fast lookup with the added IDs
appended (the workflow transform would map them to OOV, so it is refused).

Wire contract (model `executor_model`; triton_models/client.py speaks it):
    inputs   item_id-list__values   BYTES  [1, N]    raw item IDs (UTF-8) of all sessions of the request
             item_id-list__offsets  INT32  [1, B+1]  session b = values[offsets[b]:offsets[b+1]]
             exclude_ids            BYTES  [1, E]    OPTIONAL business rule: raw IDs never returned to any
                                                     session of the request
             include_ids            BYTES  [1, I]    OPTIONAL business rule: only these raw IDs may be returned
                                                     (fewer than K left: padding); unknown IDs in either list
                                                     are ignored and counted in `unknown_rule_ids`
             filter                 BYTES  [1, 1]    OPTIONAL business rule: one JSON object over the catalog's
                                                     attributes (odmt_t4r/model/item_filter.py); a malformed one
                                                     gets an error (HTTP 400) for its request only
    outputs  item_ids               BYTES  [1, B, K] raw item IDs, best first; b"" pads
             scores                 FP32   [1, B, K] descending; -inf where the ID is b""
             contribution_<branch>  FP32   [1, B, K] OPTIONAL, one per branch in the fused score (id, text,
                                    image): the branch's weighted score of the item above an average catalog
                                    item's; the largest names the branch that drove it (odmt_t4r/model/explain.py).
                                    Computed only for runs where a request asks for it; 0 for padding and
                                    empty sessions. A request naming no outputs gets all of them (Triton's rule).
             unknown_ids            INT32  [1, B, 1] how many of the session's raw IDs the served catalog does not
                                    hold (fast: the whole session; workflow: the last L items it keeps). Sent only
                                    to requests that name it or name no outputs; a session of unknown IDs only is
                                    answered from OOV tokens alone: not personalised.
             unknown_rule_ids       INT32  [1, B, 2] the raw IDs of the request's exclude_ids / include_ids that
                                    the served catalog does not hold (ignored); 0 and 0 without rules.
The leading 1 is the request's batch entry: the executor declares `max_batch_size: 64` so Triton's
dynamic batcher can merge concurrent requests, and the executor scores all their sessions in one
graph run. `--max-batch-size 0` keeps merlin's unbatched shapes ([N], [B+1], [B, K]), no batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


MODEL_NAME = "executor_model"
TRANSFORMS = ("fast", "workflow")
RULE_INPUTS = ("exclude_ids", "include_ids", "filter")  # triton_models.predict.RULE_INPUTS: optional, per request
from odmt_t4r.contract import ITEM_LIST as INPUT, run_data_dir, run_item_ids  # noqa: E402
from odmt_t4r.flags import flag  # noqa: E402


@dataclass
class ServingConfig:
    k: int = field(default=10, metadata=flag("recommendations per session"))
    transform: str = field(default="fast", metadata=flag(
        "fast: vocabulary lookup in the executor; workflow: the saved NVTabular workflow", choices=TRANSFORMS))
    # requests the dynamic batcher may merge into one executor call
    max_batch_size: int = field(default=64, metadata=flag("requests Triton may merge per executor call (0: no "
                                                          "dynamic batching)"))
    # 0: batch whatever queued while the instance was busy; no added wait
    max_queue_delay_us: int = field(default=0, metadata=flag("microseconds Triton may wait to merge requests"))
    instances: int = field(default=1, metadata=flag("CPU instances of the executor model (one stub process each)"))
    workflow_instances: int = 1  # CPU instances of the NVTabular workflow model (workflow transform)
    torch_threads: int = 1  # intra-op threads per instance (2 cores: more threads only contend)
    max_sessions_per_run: int = 256  # sessions of merged requests scored together (memory bound)
    jit: bool = True  # TorchScript-trace the sequence encoders at load (checked against eager, else eager)


def load_inference_workflow(data_dir: Path):
    """The prepared DIR's fitted inference workflow (a pickle: the DIR is checked against its manifest first)."""
    import nvtabular as nvt

    from odmt_t4r.prepare import FORMAT as PREPARED_FORMAT
    from odmt_t4r.trust import verify_folder

    path = Path(data_dir) / "workflows" / "inference"
    if not (path / "workflow.pkl").is_file():
        raise FileNotFoundError(f"{path} holds no saved workflow: was {data_dir} made by `odmt prepare`?")
    verify_folder(data_dir, PREPARED_FORMAT, "prepared folder")
    return nvt.Workflow.load(str(path))


def vocabulary_ids(workflow, column: str = INPUT) -> list[str]:
    """index -> raw item ID from the fitted Categorify vocabulary ("" for the reserved rows 0-2)."""
    import pandas as pd
    from merlin.dag import postorder_iter_nodes
    from nvtabular.ops import Categorify

    cats = [n.op for n in postorder_iter_nodes(workflow.output_node) if isinstance(n.op, Categorify)]
    if len(cats) != 1:
        raise ValueError(f"the inference workflow has {len(cats)} Categorify ops; expected one")
    cat = cats[0]
    storage = cat.storage_name.get(column, column)
    vocab = pd.read_parquet(cat.categories[storage])
    values = vocab[storage] if storage in vocab else vocab.iloc[:, 0]
    n = int(vocab.index.max()) + 1 if len(vocab) else 3
    ids = [""] * n
    for label, value in zip(vocab.index.tolist(), values.tolist()):
        ids[int(label)] = str(value)
    return ids


def added_ids(run: str | Path, data_dir: str | Path, vocabulary: list[str]) -> list[str]:
    """The raw IDs a RUN indexes after the workflow's vocabulary (`odmt add-items`), in index order."""
    ids = run_item_ids(run, data_dir)
    if len(ids) < len(vocabulary) or any(str(a) != b for a, b in zip(ids[3:len(vocabulary)], vocabulary[3:])):
        raise ValueError(f"{run} does not index items like {data_dir}'s inference workflow: was it trained there?")
    return [str(i) for i in ids[len(vocabulary):]]


def build_ensemble(run: str | Path, data_dir: str | Path | None = None, cfg: ServingConfig | None = None):
    """(Ensemble, its OdmtPredict op, the inference workflow) for a RUN; nothing is written."""
    from merlin.systems.dag import Ensemble
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    from triton_models.predict import OdmtPredict
    from triton_models.vocab_lookup import VocabularyLookup

    cfg = cfg or ServingConfig()
    if cfg.transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, not {cfg.transform!r}")
    run = Path(run).resolve()
    data_dir = run_data_dir(run, data_dir)
    workflow = load_inference_workflow(data_dir)
    column = workflow.input_schema.column_names[0]
    vocabulary = vocabulary_ids(workflow, column)
    added = added_ids(run, data_dir, vocabulary)
    if added and cfg.transform != "fast":
        raise ValueError(f"{run} holds {len(added)} items added after training, which the NVTabular workflow "
                         "maps to OOV: serve it with the fast transform")
    predict = OdmtPredict(run, vocabulary + added, k=cfg.k, data_dir=data_dir,
                          input_column=column, torch_threads=cfg.torch_threads, jit=cfg.jit)
    if cfg.transform == "fast":
        encode = VocabularyLookup.from_workflow(workflow, column).extended(added)
    else:
        encode = TransformWorkflow(workflow)
    graph = [column] >> encode >> predict
    return Ensemble(graph, workflow.input_schema), predict, workflow


def graph_chain(ensemble) -> list:
    from merlin.dag import postorder_iter_nodes

    return [n for n in postorder_iter_nodes(ensemble.graph.output_node) if n.op is not None
            and type(n.op).__name__ != "SelectionOp"]


def declare_rule_inputs(config) -> None:
    """Adds the optional business-rule inputs to the executor's config.pbtxt (a ModelConfig message): merlin
    declares only the graph's input columns, and Triton refuses a request input its config does not name."""
    import tritonclient.grpc.model_config_pb2 as mc

    present = {tensor.name for tensor in config.input}
    for name in RULE_INPUTS:
        if name not in present:
            config.input.append(mc.ModelInput(name=name, data_type=mc.TYPE_STRING, dims=[-1], optional=True))


def wire_contract(cfg: ServingConfig) -> dict:
    lead = "1, " if cfg.max_batch_size > 0 else ""  # one batch entry per request when Triton batches
    return {"model": MODEL_NAME, "max_batch_size": cfg.max_batch_size,
            "inputs": {f"{INPUT}__values": f"BYTES [{lead}N] raw item IDs, UTF-8",
                       f"{INPUT}__offsets": f"INT32 [{lead}B+1] session b = values[offsets[b]:offsets[b+1]]",
                       "exclude_ids": f"BYTES [{lead}E] optional: raw IDs never returned (the whole request)",
                       "include_ids": f"BYTES [{lead}I] optional: only these raw IDs may be returned",
                       "filter": f"BYTES [{lead}1] optional: a JSON object over the catalog's attributes "
                                 "(docs/operations.md#attribute-filters-filter-and-new-arrivals)"},
            "outputs": {"item_ids": f"BYTES [{lead}B, {cfg.k}] best first, b'' pads",
                        "scores": f"FP32 [{lead}B, {cfg.k}] descending, -inf where the ID is b''",
                        "contribution_<branch>": f"FP32 [{lead}B, {cfg.k}] optional, computed only when requested: "
                                                 "one per branch in the fused score (id/text/image), its weighted "
                                                 "lift of the item over an average catalog item; the largest drove it",
                        "unknown_ids": f"INT32 [{lead}B, 1] the session's raw IDs not in the served catalog"
                                       + (" (counted over the whole session)" if cfg.transform == "fast" else
                                          " (among the last max_length items the workflow keeps)"),
                        "unknown_rule_ids": f"INT32 [{lead}B, 2] the request's exclude_ids / include_ids not in "
                                            "the served catalog (ignored)"}}
