"""hf-gpt2-train: GPT-2 pretraining on HuggingFace Accelerate."""

__version__ = "0.1.0"
