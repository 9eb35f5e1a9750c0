"""biomass: pasture biomass from quadrat photos (CSIRO Image2Biomass), as a research system."""
import os

# albumentations checks PyPI for updates at import; we run offline (Kaggle notebooks, CI), so never let it try.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# MLflow 3.x sends usage telemetry from a background thread, which also sets and unsets an environment variable while
# other threads read os.environ: a sweep child died of it (KeyError '_MLFLOW_TELEMETRY_SESSION_ID' inside requests'
# proxy lookup). Off for us and for every process we start (children, the sweep's mlflow server inherit it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
