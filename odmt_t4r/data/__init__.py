"""Data sources behind one interface: `load_source(name, ...) -> RawData` (see base.RawData)."""

from odmt_t4r.data.base import DataValidationError, RawData
from odmt_t4r.data.sources import SOURCES, load_source

__all__ = ["DataValidationError", "RawData", "SOURCES", "load_source"]
