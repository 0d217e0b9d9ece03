"""gpt2fast: a fast, clean GPT-2 for PyTorch."""
