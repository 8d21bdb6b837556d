"""Named-entity tagging for finetune: the `token-classification` task and the `entities` metric,
registered through finetune's entry points (see pyproject.toml)."""
