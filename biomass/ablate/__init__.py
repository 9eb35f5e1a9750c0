"""Ablations: spec files resolved to validated variants (`spec`), run as one training process each (`runner`),
compared in one table, chart and MLflow parent run per file (`report`). The CLI is `python -m biomass.ablate`."""
