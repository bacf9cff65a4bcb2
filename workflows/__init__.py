"""NVTabular workflows: one function per workflow, each returning an unfitted `nvt.Workflow`."""

from workflows.ops import Groupby, ListSlice, TrainingWindows
from workflows.sessions import (
    ITEM_COL, ITEM_LIST, SEEN_LIST, USER_COL, USER_IDX, SessionConfig,
    extend_vocabulary, fit_fixed_vocabulary, fitted_vocabulary, inference_workflow, item_vocabulary, on_gpu, partition_by_user, session_workflow,
    split_workflow, run_session_workflows, user_vocabulary,
)

__all__ = [
    "Groupby", "ListSlice", "TrainingWindows",
    "ITEM_COL", "ITEM_LIST", "SEEN_LIST", "USER_COL", "USER_IDX", "SessionConfig",
    "extend_vocabulary", "fit_fixed_vocabulary", "fitted_vocabulary", "inference_workflow", "item_vocabulary", "on_gpu", "partition_by_user", "user_vocabulary", "run_session_workflows", "session_workflow", "split_workflow",
]
