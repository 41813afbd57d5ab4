"""The models in plain PyTorch, plus shared parts (backbones, necks)."""
