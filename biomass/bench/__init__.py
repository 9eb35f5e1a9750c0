"""Benchmarks (`python -m biomass.bench`): loader, training step, inference chain, ridge, augmentation order."""
