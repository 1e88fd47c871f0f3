"""Model families, checkpoint loading and key conversion."""

from .bundle import EPSILON, FLOW, V_PREDICTION, Family, ModelBundle, Schedule, base_model_version

__all__ = ["EPSILON", "FLOW", "V_PREDICTION", "Family", "ModelBundle", "Schedule", "base_model_version"]
