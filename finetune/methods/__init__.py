"""Built-in methods: feature-extraction, full, lora. Registered in pyproject.toml like any plugin's."""
