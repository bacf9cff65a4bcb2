"""ODMT as Transformers4Rec blocks: the IMT item tower, per-modality branches, the peer-distillation task.

    from odmt_t4r.model import OdmtRecommender, build_model, model_registry
    model = build_model("odmt", "prepared/ml-100k")          # fresh, sized from the DIR's schema
    model = OdmtRecommender.from_pretrained("runs/odmt")     # a trained RUN, in eval mode
    scores, items = model.recommend(history, k=10)           # history [B L] right-padded item indices
"""

from .branch import Branch, SequenceEncoderConfig, sequence_encoder
from .item_tower import ITEM_TOWERS, IdAwareMultiModalTransformer, IndependentItemTower, ItemTowerConfig
from .modality_store import ModalityStore, TokenLayout
from .odmt import (
    OdmtConfig,
    OdmtRecommender,
    build_model,
    clip_history,
    history_and_target,
    model_registry,
    split_targets,
)
from .peer_distillation import PeerDistillationTask, fuse, kd_ramp, soft_cross_entropy, teacher_map
from .prepared import PreparedInfo, item_column, load_schema, read_prepared

__all__ = [
    "Branch", "SequenceEncoderConfig", "sequence_encoder",
    "ITEM_TOWERS", "IdAwareMultiModalTransformer", "IndependentItemTower", "ItemTowerConfig",
    "ModalityStore",
    "TokenLayout",
    "OdmtConfig", "OdmtRecommender", "build_model", "clip_history", "history_and_target", "model_registry",
    "split_targets",
    "PeerDistillationTask", "fuse", "kd_ramp", "soft_cross_entropy", "teacher_map",
    "PreparedInfo", "item_column", "load_schema", "read_prepared",
]
