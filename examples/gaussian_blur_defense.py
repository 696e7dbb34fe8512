"""A purification defense of one's own: a 3x3 Gaussian blur (the worked example of the README)."""
import torch
import torch.nn.functional as F

from lib.defenses.base import Defense


class GaussianBlur(Defense):
    """Blurs each channel with a 3x3 Gaussian kernel of standard deviation `sigma`."""

    differentiable = True   # white-box attacks use the exact gradient of purify
    randomized = False      # the same input always gives the same output: no EOT needed

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        k = torch.exp(-torch.arange(-1.0, 2.0) ** 2 / (2 * sigma ** 2))
        self.register_buffer("kernel", (k[:, None] * k[None, :] / k.sum() ** 2)[None, None])

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, self.kernel.expand(channels, 1, 3, 3), groups=channels)
