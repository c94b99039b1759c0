"""Forge: fine-tune an open model end to end — dataset → LoRA/QLoRA → merge → GGUF → Ollama → seal."""

__version__ = "0.1.0"
