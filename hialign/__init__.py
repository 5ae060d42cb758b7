"""hialign: Hierarchical Alignment — LoRA-DPO targeted at one block of a transformer's layers."""

__version__ = "0.1.0"
