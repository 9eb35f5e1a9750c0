"""biomass: pasture biomass from quadrat photos (CSIRO Image2Biomass), as a research system."""
import os

# albumentations checks PyPI for updates at import; we run offline (Kaggle notebooks, CI), so never let it try.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
