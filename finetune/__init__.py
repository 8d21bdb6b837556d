"""finetune: config-driven transfer learning for the Hugging Face ecosystem.

Importing the package stays cheap: torch, transformers, peft and friends are imported
only where a command needs them.
"""

__version__ = "0.1.0"
