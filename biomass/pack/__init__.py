"""Offline machines: the wheels each image lacks (biomass.pack.wheels), the Kaggle bundle (python -m biomass.pack)."""
