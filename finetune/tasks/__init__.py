"""Built-in tasks. Registered in pyproject.toml like any third-party plugin's."""
