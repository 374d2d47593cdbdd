"""ZO-AE-DS (Zhang et al., ICLR 2022): the baseline that DeepZero's certified defense is compared with.

An autoencoder is put behind the denoiser, ``denoiser -> encoder -> latent z -> decoder -> black box``.
The decoder is frozen and counted as part of the black box, so the zeroth-order estimate is taken
with respect to the low-dimensional latent ``z`` (a few hundred coordinates per image) instead of
the denoiser's parameters; the estimated ``dL/dz`` is then backpropagated first-order through the
white-box encoder and denoiser (the black box is a `zo_function`, so a plain backward does it).
The price is the information the bottleneck drops, which DeepZero avoids by estimating parameter
gradients directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from deepzero_apps.engine import CGE, RGE, Objective, QueryCounter, zo_function

Batch = tuple[Tensor, Tensor]
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def autoencoder(channels: int, latent_channels: int, width: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Conv encoder (two stride-2 convs: a ``latent_channels x H/4 x W/4`` latent) and its mirror decoder."""
    if min(channels, latent_channels, width) < 1:
        raise ValueError(f"autoencoder sizes must be >= 1, got {channels=}, {latent_channels=}, {width=}")
    encoder = nn.Sequential(
        nn.Conv2d(channels, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, latent_channels, 3, stride=2, padding=1),
    )
    decoder = nn.Sequential(
        nn.ConvTranspose2d(latent_channels, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
    )
    return encoder, decoder


def latent_estimator(kind: str, q: int, mu: float, seed: int) -> CGE | RGE:
    """ZO-AE-DS's latent estimators: forward CGE, or RGE with q directions on each latent's unit sphere."""
    if kind not in ("cge", "rge"):
        raise ValueError(f"unknown latent estimator '{kind}'; choose cge or rge")
    return CGE(mu=mu) if kind == "cge" else RGE(q=q, mu=mu, distribution="sphere", seed=seed)


class AEObjective(Objective):
    """``mse_weight * MSE(denoiser(x'), x) + mean stability(decoder(encoder(denoiser(x'))))``.

    The trainable module is ``Sequential(denoiser, encoder)``; the decoder is frozen and, with the
    classifier, is the black box: `latent` is ``stability`` wrapped by `zo_function` (per image, so a
    query moves every image's latent at once), and `FirstOrder` on this objective is ZO-AE-DS: the
    latent gradient is a ZO estimate (CGE: ``d_z + 1`` queries of the batch per step; RGE: ``q + 1``),
    backpropagated first-order through the encoder and denoiser; the MSE term gets its exact gradient.
    The queries counted are the black box's (`counter` is the latent function's).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        stability: PerSampleLoss,
        inputs: Callable[[Batch], Tensor],
        mse_weight: float,
        estimator: CGE | RGE | None = None,
    ):
        decoder.requires_grad_(False)
        self.denoiser, self.encoder, self.decoder = denoiser, encoder, decoder
        self.inputs, self.mse_weight = inputs, mse_weight
        self.latent = zo_function(stability, estimator, per_sample=True)
        super().__init__(nn.Sequential(denoiser, encoder))

    @property
    def counter(self) -> QueryCounter:
        return self.latent.counter

    @counter.setter
    def counter(self, counter: QueryCounter) -> None:
        self.latent.counter = counter

    def loss(self, batch: Batch) -> Tensor:
        return self._loss(batch)  # the latent function counts the black box's queries itself

    def _loss(self, batch: Batch) -> Tensor:
        denoised = self.denoiser(self.inputs(batch))
        stab = self.latent(self.encoder(denoised), batch[1]).mean()
        return self.mse_weight * F.mse_loss(denoised, batch[0]) + stab
