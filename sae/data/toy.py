"""Toy superposition data with known features (Sharkey, Braun, Millidge 2022), and its datamodule.

``n_features`` ground-truth unit directions in ``d`` dimensions; each sample is a sparse non-negative combination
of them. Feature i fires with probability proportional to ``decay**i`` (scaled so that ``avg_active`` fire on
average), with a magnitude drawn uniformly from [0, 1). With ``correlated=True`` firing is decided by thresholding
a Gaussian with a random correlation matrix, so features fire together while keeping the same marginals.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.data.datamodule import StreamDataModule
from sae.data.stream import ResumableStream
from sae.errors import ConfigError

TOY_HOOK = "toy"


def toy_stream_seed(seed: int) -> int:
    """The seed of the toy data's own generator for ``data.seed``.

    Never ``seed`` itself: a dictionary initialised from torch's global generator seeded with the same number
    would draw its random atoms from the same stream as the ground-truth directions, i.e. start at the answer.
    """
    return int.from_bytes(hashlib.blake2b(f"sae.toy:{seed}".encode(), digest_size=7).digest(), "little")


class ToyData:
    """Ground truth and a seeded sampler of toy activations (the settings' one default each: ``conf/data/toy.yaml``)."""

    def __init__(self, *, n_features: int, d: int, avg_active: float, decay: float, correlated: bool, seed: int):
        problems = self.problems(n_features, d, avg_active, decay)
        if problems:
            raise ConfigError("; ".join(problems))
        probs = decay ** torch.arange(n_features, dtype=torch.float64)
        probs = probs * avg_active / probs.sum()
        gen = torch.Generator().manual_seed(toy_stream_seed(seed))
        self.features = torch.nn.functional.normalize(torch.randn(n_features, d, generator=gen), dim=-1)
        self.probs = probs.float()
        self.correlation = self._random_correlation(n_features, gen) if correlated else None
        self._chol = torch.linalg.cholesky(self.correlation) if correlated else None
        self.generator = gen

    @staticmethod
    def problems(n_features: int, d: int, avg_active: float, decay: float) -> list[str]:
        """What is wrong with these settings (nothing: an empty list)."""
        if d <= 0 or n_features <= 0:
            return [f"toy data needs data.d > 0 and data.n_features > 0 (got d={d}, n_features={n_features})"]
        if not 0 < decay <= 1:
            return [f"data.decay={decay} must be in (0, 1]"]
        probs = decay ** torch.arange(n_features, dtype=torch.float64)
        if not 0 < avg_active or (probs * avg_active / probs.sum()).max() > 1:
            return [f"data.avg_active={avg_active} cannot be reached with {n_features} features (decay {decay}): "
                    "the most frequent feature would fire with probability > 1; lower avg_active or add features"]
        return []

    @staticmethod
    def _random_correlation(n: int, gen: torch.Generator) -> torch.Tensor:
        """The interim report's random correlation matrix: a symmetric matrix of uniform [0, 1) entries, its
        diagonal raised until it is positive definite, scaled to unit diagonal (weak, mostly positive
        correlations: features tend to fire together)."""
        m = torch.rand(n, n, generator=gen, dtype=torch.float64)
        m = (m + m.T) / 2
        lowest = torch.linalg.eigvalsh(m)[0].item()
        m += (max(0.0, -1.001 * lowest) + 1e-3) * torch.eye(n, dtype=torch.float64)
        std = m.diagonal().sqrt()
        return m / std[:, None] / std[None, :]

    def _firing(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.correlation is None:
            return torch.rand(n, len(self.probs), generator=gen) < self.probs
        z = torch.randn(n, len(self.probs), generator=gen, dtype=torch.float64) @ self._chol.T
        threshold = torch.distributions.Normal(0.0, 1.0).icdf(self.probs.double())
        return z < threshold

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, d]`` activations (from the data's own stream unless a ``generator`` is given)."""
        gen = generator or self.generator
        magnitudes = torch.rand(n, len(self.probs), generator=gen)
        return (self._firing(n, gen) * magnitudes) @ self.features

    def save(self, path: str | Path) -> None:
        tensors = {"features": self.features, "probs": self.probs}
        if self.correlation is not None:
            tensors["correlation"] = self.correlation.float()
        save_file(tensors, str(path))


class ToyStream(ResumableStream):
    """Toy batches of ``batch_size`` generated ``chunk`` batches at a time from ``generator``; with several processes
    each generates the same global batches and keeps its own slice of each (``rank`` of ``world_size``), so the
    processes together see exactly what one process would."""

    def __init__(self, toy: ToyData, batch_size: int, generator: torch.Generator, chunk: int = 64,
                 rank: int = 0, world_size: int = 1):
        self.toy, self.batch_size, self.generator, self.chunk = toy, batch_size, generator, chunk
        self.share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        super().__init__()

    def _position(self) -> dict:
        return {"generator": self.generator.get_state()}

    def _restore(self, position: dict) -> None:
        self.generator.set_state(position["generator"])

    def _fill(self) -> list[dict[str, torch.Tensor]]:
        block = self.toy.sample(self.batch_size * self.chunk, self.generator)
        return [{TOY_HOOK: b[self.share]} for b in block.split(self.batch_size)]


class ToyDataModule(StreamDataModule):
    """Batches ``{"toy": [batch_size, d]}`` drawn on the fly; the stream continues the data's own generator after
    the normalisation sample (``sample``)."""

    def __init__(self, toy: ToyData, batch_size: int, chunk: int = 64):
        super().__init__(batch_size)
        self.toy, self.chunk = toy, chunk

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        return {TOY_HOOK: self.toy.sample(n)}

    def make_stream(self) -> ToyStream:
        generator = torch.Generator()
        generator.set_state(self.toy.generator.get_state())
        return ToyStream(self.toy, self.batch_size, generator, self.chunk, self.rank, self.world_size)
