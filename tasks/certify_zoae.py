"""ZO-AE-DS (Zhang et al., ICLR 2022): the baseline that DeepZero's certified defense is compared with.

An autoencoder is put behind the denoiser, ``denoiser -> encoder -> latent z -> decoder -> black box``.
The decoder is frozen and counted as part of the black box, so the zeroth-order estimate is taken
with respect to the low-dimensional latent ``z`` (a few hundred coordinates per image) instead of
the denoiser's parameters; the estimated ``dL/dz`` is then backpropagated first-order through the
white-box encoder and denoiser (``z.backward(g_hat)``). The price is the information the bottleneck
drops, which DeepZero avoids by estimating parameter gradients directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepzero_apps.engine import Objective

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


class AEObjective(Objective):
    """``mse_weight * MSE(denoiser(x'), x) + mean stability(decoder(encoder(denoiser(x'))))``.

    The trainable module is ``Sequential(denoiser, encoder)``; the decoder is frozen. `_loss` is the
    whole loss (what the estimator's base query equals); `LatentZO` computes its gradient.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        stability: PerSampleLoss,
        inputs: Callable[[Batch], Tensor],
        mse_weight: float,
    ):
        decoder.requires_grad_(False)
        self.denoiser, self.encoder, self.decoder = denoiser, encoder, decoder
        self.stability, self.inputs, self.mse_weight = stability, inputs, mse_weight
        super().__init__(nn.Sequential(denoiser, encoder))

    def _loss(self, batch: Batch) -> Tensor:
        denoised = self.denoiser(self.inputs(batch))
        z = self.encoder(denoised)
        with torch.no_grad():
            stab = self.stability(z, batch[1]).mean()
        return self.mse_weight * F.mse_loss(denoised, batch[0]) + stab


class LatentZO:
    """The ZO-AE-DS gradient: per-image ZO estimate of ``d stability / dz``, then backprop through the encoder.

    Each image's stability loss depends on its own latent only, so one query of the batch perturbs
    every image's latent at once and yields one difference per image:

    cge: coordinate j of every latent moved by mu, ``d_z + 1`` queries of the batch per step;
    rge: q directions uniform on each latent's unit sphere, ``g = d_z / q * sum_k (f(z + mu u_k) - f(z)) / mu * u_k``,
         ``q + 1`` queries of the batch per step. Directions are a pure function of (seed, step, k).
    The MSE term is white-box and gets its exact gradient. Fills ``p.grad`` like the engine's estimators.
    """

    def __init__(self, scheme: Literal["cge", "rge"] = "cge", q: int = 192, mu: float = 5e-3, seed: int = 0):
        if scheme not in ("cge", "rge"):
            raise ValueError(f"unknown latent estimator '{scheme}'; choose cge or rge")
        if q < 1 or not mu > 0:
            raise ValueError(f"need q >= 1 and mu > 0, got q={q}, mu={mu}")
        self.scheme, self.q, self.mu, self.seed = scheme, int(q), float(mu), int(seed)

    def queries_per_step(self, latent_dim: int) -> int:
        """Black-box queries of the batch per step (each sends every image of the batch once)."""
        return (latent_dim if self.scheme == "cge" else self.q) + 1

    def latent_grad(self, objective: AEObjective, z: Tensor, target: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(per-image losses at z, ZO estimate of d mean-loss / dz), both without autograd."""
        flat = z.reshape(len(z), -1)

        def f(w: Tensor) -> Tensor:
            objective.counter.add(1, 1.0)
            return objective.stability(w.view_as(z), target)

        f0 = f(flat)
        grad = torch.zeros_like(flat)
        if self.scheme == "cge":
            for j in range(flat.shape[1]):
                moved = flat.clone()
                moved[:, j] += self.mu
                grad[:, j] = (f(moved) - f0) / self.mu
        else:
            d = flat.shape[1]
            for k in range(self.q):
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 65_537 + k)
                u = torch.randn(flat.shape, generator=gen).to(flat)
                u = u / u.norm(dim=1, keepdim=True)
                grad += ((f(flat + self.mu * u) - f0) / self.mu).unsqueeze(1) * u
            grad *= d / self.q
        return f0, (grad / len(flat)).view_as(z)

    def estimate(self, objective: AEObjective, batch: Batch, coords: Tensor | None = None, step: int = 0) -> float:
        if coords is not None:
            raise ValueError("ZO-AE-DS estimates latent gradients; sparse parameter coordinates do not apply")
        params = [b.param for b in objective.coords.blocks]
        with torch.enable_grad():
            denoised = objective.denoiser(objective.inputs(batch))
            z = objective.encoder(denoised)
            with torch.no_grad():
                f0, g_hat = self.latent_grad(objective, z.detach(), batch[1], step)
            mse = objective.mse_weight * F.mse_loss(denoised, batch[0])
            grads = torch.autograd.grad([mse, z], params, grad_outputs=[torch.ones_like(mse), g_hat], allow_unused=True)
        objective.coords.write_grad(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
        return float(mse.detach() + f0.mean())
