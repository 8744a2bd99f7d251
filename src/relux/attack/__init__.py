"""Attack stages: critical points, signatures, signs, refinement, and the pipeline."""

from relux.attack.config import ExtractionConfig
from relux.attack.pipeline import extract
from relux.attack.result import ExtractionResult, LayerReport, SelfCheck, StageStats

__all__ = ["ExtractionConfig", "extract", "ExtractionResult", "LayerReport", "SelfCheck", "StageStats"]
