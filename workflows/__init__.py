"""NVTabular workflows: one function per workflow, each returning an unfitted `nvt.Workflow`."""

from workflows.sessions import (
    ITEM_COL, ITEM_LIST, SEEN_LIST, USER_COL, USER_IDX, SessionConfig, TrainingWindows,
    inference_workflow, item_vocabulary, session_workflow, split_workflow,
)

__all__ = [
    "ITEM_COL", "ITEM_LIST", "SEEN_LIST", "USER_COL", "USER_IDX", "SessionConfig", "TrainingWindows",
    "inference_workflow", "item_vocabulary", "session_workflow", "split_workflow",
]
