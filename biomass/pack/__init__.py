"""Offline machines: the wheels each image lacks (biomass.pack.wheels) and the Kaggle bundle (python -m biomass.pack)."""
