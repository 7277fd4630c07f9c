"""Models for training through the shards (PyTorch): `llama`, a LLaMA-style decoder."""
