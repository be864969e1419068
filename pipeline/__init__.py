"""MoRE multi-task fine-tuning pipeline: prep -> train -> merge -> evaluate."""
