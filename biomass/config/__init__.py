"""Experiment configs: the schema of every knob (`config.schema`) and how YAML files, `base:` chains and dotted
overrides become one validated config (`config.load`)."""
