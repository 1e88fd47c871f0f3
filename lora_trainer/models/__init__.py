"""Model families, checkpoint loading and key conversion."""

from .bundle import EPSILON, V_PREDICTION, Family, ModelBundle, Schedule, base_model_version

__all__ = ["EPSILON", "V_PREDICTION", "Family", "ModelBundle", "Schedule", "base_model_version"]
