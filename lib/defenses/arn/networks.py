"""ARN's networks (spec §2.2): the autoencoder E/G, the baselines' generators, and the two discriminators.

Every generator takes [0, 1] images (scaled to [-1, 1] inside, as the official code does) and returns a
`GenOutput` whose reconstruction is in [-1, 1] space; `Purifier` (defense.py) maps it back to [0, 1].
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from lib.validate import check_positive_int

# (kernel, stride, padding) of each encoder convolution and of the latent convolution, per image side.
# 28: the official MNIST stack (the 2x2 kernel maps 14 -> 8); 32: k4 s2 p1 throughout (spec §2.2, A13);
# 8: the CPU stack of spec §7.b. The decoder mirrors the encoder with transposed convolutions.
LAYER_PLANS: dict[int, tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]] = {
    8: (((3, 1, 1), (4, 2, 1), (4, 2, 1)), (2, 1, 0)),
    28: (((4, 2, 1), (2, 2, 1), (4, 2, 1), (4, 2, 1)), (4, 2, 1)),
    32: (((4, 2, 1), (4, 2, 1), (4, 2, 1), (4, 2, 1)), (4, 2, 1)),
}


def _plan(image_size: int, n_layers: int) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]:
    if image_size not in LAYER_PLANS:
        raise ValueError(f"ARN networks support image sides {sorted(LAYER_PLANS)}, got {image_size}")
    convs, latent = LAYER_PLANS[image_size]
    if n_layers != len(convs):
        raise ValueError(f"image side {image_size} needs {len(convs)} widths, got {n_layers}")
    return convs, latent


def _init_weights(module: nn.Module) -> None:
    """The official code's init: conv weights ~ N(0, 0.02); BatchNorm weights ~ N(0, 0.02) (sic), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class GenOutput(NamedTuple):
    """A purifier network's output: reconstruction in [-1, 1] space; latent mean, log-variance and code (or None)."""

    out: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None


class ARNAutoencoder(nn.Module):
    """E (conv-BN-LReLU stack, then parallel mu / logvar convolutions) and G (mirrored transposed convolutions, tanh).

    Training samples z = mu + eps * exp(logvar / 2), eps drawn from `noise` (the trainer's own generator) or the
    global RNG; evaluation uses z = mu (spec §2.7, A15).
    """

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int] = (128, 256, 512, 1024),
                 latent: int = 2048):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(latent, "latent")
        convs, (lk, ls, lp) = _plan(image_size, len(widths))
        chans = [in_channels, *widths]
        enc: list[nn.Module] = []
        for (k, s, p), c_in, c_out in zip(convs, chans[:-1], chans[1:]):
            enc += [nn.Conv2d(c_in, c_out, k, s, p), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*enc)
        self.mu = nn.Conv2d(widths[-1], latent, lk, ls, lp)
        self.logvar = nn.Conv2d(widths[-1], latent, lk, ls, lp)
        dec: list[nn.Module] = [nn.ConvTranspose2d(latent, widths[-1], lk, ls, lp), nn.BatchNorm2d(widths[-1]),
                                nn.LeakyReLU(0.2)]
        for i in reversed(range(len(convs))):
            k, s, p = convs[i]
            dec.append(nn.ConvTranspose2d(chans[i + 1], chans[i], k, s, p))
            dec += [nn.BatchNorm2d(chans[i]), nn.LeakyReLU(0.2)] if i > 0 else [nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        self.latent_dim = latent
        _init_weights(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (N, latent), of a [0, 1] batch."""
        h = self.encoder(2 * x - 1)
        return self.mu(h).flatten(1), self.logvar(h).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [-1, 1] space from codes (N, latent)."""
        return self.decoder(z[:, :, None, None])

    def forward(self, x: torch.Tensor, noise: torch.Generator | None = None) -> GenOutput:
        mu, logvar = self.encode(x)
        if not self.training:
            return GenOutput(self.decode(mu), mu, logvar, mu)
        eps = torch.randn(mu.shape, generator=noise).to(mu) if noise is not None else torch.randn_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        return GenOutput(self.decode(z), mu, logvar, z)


class ConvGenerator(nn.Module):
    """Two strided convolutions and two transposed convolutions (APE-GAN's generator shape, spec §3.5).

    residual=False: outputs the image through tanh (APE-GAN). residual=True: predicts the adversarial noise and
    returns x - noise (HGD's denoiser predicts the noise). Works on any side divisible by 4. Deterministic:
    `noise` is accepted so that every generator is called alike, and unused.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (64, 128), residual: bool = False):
        super().__init__()
        c1, c2 = widths
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.ConvTranspose2d(c1, in_channels, 4, 2, 1),
        )
        self.residual = residual
        _init_weights(self)

    def forward(self, x: torch.Tensor, noise: torch.Generator | None = None) -> GenOutput:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ConvGenerator needs sides divisible by 4, got {tuple(x.shape[-2:])}")
        h = self.net(2 * x - 1)
        return GenOutput(2 * x - 1 - h if self.residual else torch.tanh(h))


class AttackDiscriminator(nn.Module):
    """D_A: an MLP from the latent code to one logit per domain (no BN, LeakyReLU 0.2 between layers)."""

    def __init__(self, latent: int, n_domains: int, hidden: Sequence[int] = (1024, 256, 64)):
        super().__init__()
        check_positive_int(n_domains, "n_domains")
        dims = [latent, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], n_domains))
        self.n_domains = n_domains

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ImageDiscriminator(nn.Module):
    """D_I: the encoder's convolution plan with LeakyReLU, no BN, then FC -> hidden -> 1 logit (real vs restored)."""

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int] = (32, 64, 128, 256),
                 hidden: int = 512):
        super().__init__()
        convs, _ = _plan(image_size, len(widths))
        chans = [in_channels, *widths]
        layers: list[nn.Module] = []
        side = image_size
        for (k, s, p), c_in, c_out in zip(convs, chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, k, s, p), nn.LeakyReLU(0.2)]
            side = (side + 2 * p - k) // s + 1
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * side * side, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        _init_weights(self)

    def forward(self, x_pm: torch.Tensor) -> torch.Tensor:
        """Logits (N,) of images in [-1, 1] space."""
        return self.net(x_pm).squeeze(1)
