"""The models of Kingma & Ba's section 6, scaled to 8x8 digits.

=====================  ==========================================  =====================
paper (section)         paper's model                               ours
=====================  ==========================================  =====================
6.1 logistic regr.      multiclass linear softmax on 784 pixels    the same on 64 pixels
6.2 MLP                 2 x 1000 ReLU, dropout                      2 x 256 ReLU, dropout 0.5
6.3 CNN                 c64-c64-c128 (5x5, 3x3 max-pool) + fc 1000  c16-c32 (3x3) + fc 64
6.4 bias correction     VAE, one hidden layer of 500, 50 latents    VAE, 128 hidden, 8 latents
=====================  ==========================================  =====================
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def logistic_regression(features: int, classes: int) -> nn.Module:
    """Multiclass logistic regression: one linear layer; the softmax lives in the loss."""
    return nn.Linear(features, classes)


def mlp(features: int, classes: int, hidden: int = 256, dropout: float = 0.5) -> nn.Module:
    """Two ReLU hidden layers, each followed by dropout (the paper's 6.2 network, smaller)."""
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, classes),
    )


def cnn(classes: int) -> nn.Module:
    """Two 3x3 convolutions with 2x2 max-pooling, then a 64-unit ReLU layer, on 1x8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


class VAE(nn.Module):
    """A variational autoencoder with Gaussian latents and a Bernoulli decoder.

    ``forward(x)`` returns the negative evidence lower bound per example,

        -ELBO(x) = BCE(decoder(z), x) + KL(q(z|x) || N(0, I)),   z = mu + sigma * noise,

    with the reconstruction term summed over pixels (targets in [0, 1]) and the KL term
    ``-1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)`` in closed form.
    """

    def __init__(self, features: int, hidden: int = 128, latents: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, hidden), nn.Softplus())
        self.mean = nn.Linear(hidden, latents)
        self.log_variance = nn.Linear(hidden, latents)
        self.decoder = nn.Sequential(nn.Linear(latents, hidden), nn.Softplus(), nn.Linear(hidden, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        mu, log_var = self.mean(h), self.log_variance(h)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
        kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).sum(dim=1)
        return (reconstruction + kl).mean()


__all__ = ["VAE", "cnn", "logistic_regression", "mlp"]
