"""Cross-validated training of an experiment: stages x folds (`experiment`), and what a run reports (`outputs`)."""
