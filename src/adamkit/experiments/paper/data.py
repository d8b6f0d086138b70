"""Data sets that ship with the install, standing in for the paper's.

Kingma & Ba (2015, section 6) train on MNIST, IMDB and CIFAR-10, none of which can be
downloaded here.  The substitutes:

* **digits** (for MNIST and CIFAR-10): scikit-learn's bundled 8x8 handwritten digits,
  1797 images of 10 classes, pixel values 0..16 scaled to [0, 1]; a fixed stratified
  80/20 split (1437 train, 360 test).
* **sparse bag of words** (for IMDB): a synthetic sentiment task generated here.  The
  paper's point about IMDB is that its 10,000 bag-of-words features are *sparse*: most
  words are rare, so most coordinates see a non-zero gradient only now and then.  We
  draw documents of ~60 words from a Zipf(1.1) vocabulary of 5000 words, label each by
  the sign of a sparse linear score over "sentiment" words spread across the frequency
  range, and keep binary presence features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """Train and test tensors of one classification data set (float32 features, int64 labels)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


def digits(seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits scaled to [0, 1], stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the digits data needs scikit-learn: pip install 'adamkit[experiments]'") from exc

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.2, stratify=bunch.target, random_state=seed
    )
    return Split("digits", *map(torch.from_numpy, (x_train, np.int64(y_train), x_test, np.int64(y_test))))


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Flat 64-pixel digits as ``(N, 1, 8, 8)`` images."""
    return x.reshape(-1, 1, 8, 8)


def sparse_bag_of_words(
    documents: int = 2500,
    vocabulary: int = 5000,
    words_per_document: int = 60,
    sentiment_words: int = 400,
    seed: int = 0,
) -> Split:
    """The synthetic sparse sentiment task described in the module docstring (80/20 split)."""
    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, vocabulary + 1) ** 1.1
    frequency /= frequency.sum()
    x = np.zeros((documents, vocabulary), dtype=np.float32)
    for row in range(documents):
        x[row, rng.choice(vocabulary, size=words_per_document, p=frequency)] = 1.0
    weights = np.zeros(vocabulary)
    carriers = rng.choice(np.arange(20, vocabulary), size=sentiment_words, replace=False)  # not the stop words
    weights[carriers] = rng.standard_normal(sentiment_words) / np.sqrt(frequency[carriers] * words_per_document)
    score = x @ weights
    y = (score > np.median(score)).astype(np.int64)
    cut = int(0.8 * documents)
    return Split("sparse bag of words", *map(torch.from_numpy, (x[:cut], y[:cut], x[cut:], y[cut:])))


__all__ = ["Split", "as_images", "digits", "sparse_bag_of_words"]
