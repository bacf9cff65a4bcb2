"""Triton python-backend entry point of the exported NVTabular workflow model (`--transform workflow`):
merlin-systems' own workflow model, with request strings decoded as UTF-8.

merlin-systems 23.08 reads every input with `merlin.systems.triton._convert_tensor`
(merlin/systems/triton/__init__.py, line 155: `out = out.astype("str")`), which decodes Triton's BYTES
as ASCII: a request holding any non-ASCII item ID fails with UnicodeDecodeError, and a vocabulary entry
with non-ASCII characters could never be matched. This module swaps in a converter that decodes
UTF-8 (undecodable bytes are kept as surrogate escapes, so they match nothing and encode as OOV, as
in the fast transform) and otherwise keeps the upstream behaviour, then serves the upstream model.

export.py copies this file into the model repository as <n>_transformworkflowtriton/1/model.py.
"""

from __future__ import annotations

import numpy as np
from merlin.systems.triton.models import workflow_model as _upstream


def _convert_tensor(tensor):
    out = tensor.as_numpy()
    if len(out.shape) == 2:  # upstream: a [N, 1] column
        out = out[:, 0]
    if out.dtype.kind in ("O", "S", "U"):
        out = np.array([v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
                        for v in out.tolist()], dtype=str)
    return out


_upstream._convert_tensor = _convert_tensor  # the upstream model looks it up in its module at call time


class TritonPythonModel(_upstream.TritonPythonModel):
    """merlin.systems.triton.models.workflow_model.TritonPythonModel, UTF-8 aware."""
