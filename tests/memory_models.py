"""A model for ``adamkit memory``'s import-path form (``memory_models:small_convnet``)."""

import torch


def small_convnet() -> torch.nn.Module:
    """A small image classifier: convolutions, a norm, and a linear head (odd sizes, so
    quantization blocks end ragged)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3),
        torch.nn.BatchNorm2d(24),
        torch.nn.ReLU(),
        torch.nn.Conv2d(24, 40, 5),
        torch.nn.Flatten(),
        torch.nn.Linear(40 * 6 * 6, 97),
    )


def frozen_backbone() -> torch.nn.Module:
    """A frozen embedding under a trainable head: the optimizer holds state for the head only."""
    model = torch.nn.Sequential(torch.nn.Embedding(5000, 64), torch.nn.Linear(64, 10))
    model[0].weight.requires_grad_(False)
    return model
