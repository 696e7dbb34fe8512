"""Timed paper-scale work on synthetic tensors: one training epoch of each heavy network and PGD-100, as a table.

    python -m lib.gpu_check            # the paper profile's shapes and batch sizes (minutes on one GPU)
    python -m lib.gpu_check --tiny     # the same code at narrow widths (TINY), 2 batches of 4 images (seconds on a CPU)

Part of scripts/gpu_check.sh (issue 16). Each training row runs one epoch of forward, loss, backward and optimizer
step of the paper's networks at the paper profile's architecture, image shape, batch size and training-set size, on
random images (CIFAR-10 shaped, 3 x 32 x 32): what it measures is the networks' cost per epoch, not the papers'
algorithms (no adversarial examples are crafted inside the epoch, the losses are simple stand-ins of the papers'
terms, the classifiers are not pretrained). The PGD row attacks 1,000 CIFAR-10-shaped images with 100 steps on the
profile's CIFAR-10 classifier (random weights). Each row reports seconds, images per second and its peak memory
(CUDA max allocated on a GPU, else the process's peak RSS so far).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lib import memory
from lib.profiles import dataset_config, load_profile, notebook_config
from lib.runtime import get_device

SHAPE = (3, 32, 32)          # CIFAR-10, where every heavy training of the series runs at the paper's scale
CLASSES = 10
PGD_IMAGES, PGD_STEPS = 1000, 100
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# --tiny: the paper profile with every network narrowed (same layers and image shapes), so a test runs it in seconds
TINY = {"datasets.cifar10.classifier.width": 0.125, "notebooks.01_sfm_defense.sfm.base_width": 4,
        "notebooks.02_idfr.denoiser.width": 0.125, "notebooks.04_image_reconstruction.restorer.n_feats": 8,
        "notebooks.04_image_reconstruction.restorer.n_blocks": 2,
        "notebooks.05_attack_invariant_arn.arn.widths": [8, 16, 32, 64],
        "notebooks.05_attack_invariant_arn.arn.latent": 32, "notebooks.05_attack_invariant_arn.arn.da_hidden": [16],
        "notebooks.05_attack_invariant_arn.arn.di_widths": [4, 8, 16, 32],
        "notebooks.05_attack_invariant_arn.arn.di_hidden": 16}


@dataclass
class Job:
    """One training to time: its networks, the loss of one batch, training-set size and batch size."""

    name: str
    modules: Sequence[nn.Module]
    loss: Step
    n_train: int
    batch_size: int


def _classifier(profile: dict, device: torch.device, role: str = "classifier") -> nn.Module:
    from lib.models import build_classifier

    spec = dataset_config(profile, "cifar10")[role]
    return build_classifier(spec["arch"], num_classes=CLASSES, in_channels=SHAPE[0], image_size=SHAPE[1],
                            mean=(0.5,) * 3, std=(0.25,) * 3, width=spec.get("width", 1.0)).to(device)


def jobs(profile: dict, device: torch.device) -> list[Job]:
    """SFM's masker with its classifier, IDFR's denoiser, paper 003's EDSR and ARN, as the profile sizes them."""
    from lib.defenses.arn.networks import ARNAutoencoder, AttackDiscriminator, ImageDiscriminator
    from lib.defenses.idfr.networks import InputDenoiser
    from lib.defenses.reconstruction.networks import EDSRRestorer
    from lib.defenses.sfm.networks import AttentionUNet

    n_cifar = 50_000
    sfm = notebook_config(profile, "01_sfm_defense")
    masker = AttentionUNet(SHAPE[0], sfm["sfm"]["base_width"], sfm["sfm"]["depth"]).to(device)
    sfm_clf = _classifier(profile, device)

    def sfm_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:   # sparsity + classification + reconstruction
        mask = masker(x)
        return F.cross_entropy(sfm_clf(x * mask), y) + mask.abs().mean() + F.mse_loss(x * mask, x)

    idfr = notebook_config(profile, "02_idfr")
    denoiser = InputDenoiser(SHAPE[0], **idfr["denoiser"]).to(device)
    target = _classifier(profile, device).eval().requires_grad_(False)

    def idfr_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the ID loss through the frozen target
        return F.cross_entropy(target(denoiser(x)), y)

    rec = notebook_config(profile, "04_image_reconstruction")
    restorer_cfg = {**rec["restorer"], **rec["per_dataset"]["cifar10"].get("restorer", {})}
    edsr = EDSRRestorer(SHAPE[0], restorer_cfg["n_feats"], restorer_cfg["n_blocks"], restorer_cfg["res_scale"]).to(device)

    def edsr_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # restore the compressed image
        return F.l1_loss(edsr(torch.round(x * 7) / 7), x)

    arn_cfg = notebook_config(profile, "05_attack_invariant_arn")["arn"]
    arn = ARNAutoencoder(SHAPE[0], SHAPE[1], arn_cfg["widths"], arn_cfg["latent"]).to(device)
    d_attack = AttackDiscriminator(arn_cfg["latent"], 2, arn_cfg["da_hidden"]).to(device)
    d_image = ImageDiscriminator(SHAPE[0], SHAPE[1], arn_cfg["di_widths"], arn_cfg["di_hidden"]).to(device)

    def arn_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:   # reconstruction, attack and image GAN terms
        out = arn(x)
        kl = -0.5 * (1 + out.logvar - out.mu ** 2 - out.logvar.exp()).mean()
        domain = F.cross_entropy(d_attack(out.z), (y % 2))
        real = F.binary_cross_entropy_with_logits(d_image(out.out), torch.ones(len(x), device=x.device))
        return F.mse_loss(out.out, 2 * x - 1) + kl + domain + real

    return [Job(f"SFM Attention U-Net (b={sfm['sfm']['base_width']}, d={sfm['sfm']['depth']}) + classifier",
                [masker, sfm_clf], sfm_loss, n_cifar - sfm["val_size"], sfm["sfm"]["batch_size"]),
            Job("IDFR input denoiser through the target", [denoiser], idfr_loss, n_cifar, idfr["id"]["batch_size"]),
            Job(f"EDSR ({restorer_cfg['n_blocks']} blocks x {restorer_cfg['n_feats']})", [edsr], edsr_loss, n_cifar,
                restorer_cfg["batch_size"]),
            Job("ARN autoencoder + attack and image discriminators", [arn, d_attack, d_image], arn_loss, n_cifar,
                arn_cfg["batch_size"])]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else memory.peak_rss_bytes()


def time_epoch(job: Job, device: torch.device, n_images: int | None = None, batch_size: int | None = None) -> dict:
    """One epoch of `job` (n_images, default its training-set size, in batches of batch_size, default its own) on
    random images: seconds, images per second and peak memory."""
    n, b = n_images or job.n_train, batch_size or job.batch_size
    params = [p for m in job.modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    for m in job.modules:
        m.train()
    gen = torch.Generator(device=device).manual_seed(0)
    _reset_peak(device)
    _synchronize(device)
    t0 = time.perf_counter()
    for start in range(0, n, b):
        size = min(b, n - start)
        x = torch.rand((size, *SHAPE), generator=gen, device=device)
        y = torch.randint(0, CLASSES, (size,), generator=gen, device=device)
        optimizer.zero_grad(set_to_none=True)
        job.loss(x, y).backward()
        optimizer.step()
    _synchronize(device)
    seconds = time.perf_counter() - t0
    return {"work": f"1 epoch: {job.name}", "images": n, "batch": b, "seconds": seconds,
            "images/s": n / seconds, "peak memory": memory.gigabytes(_peak(device))}


def time_pgd(profile: dict, device: torch.device, n_images: int = PGD_IMAGES, steps: int = PGD_STEPS) -> dict:
    """PGD-`steps` (L-inf, eps 8/255) on `n_images` CIFAR-10-shaped images, in the profile's evaluation batches,
    on its CIFAR-10 classifier."""
    from lib.attacks import generate

    model = _classifier(profile, device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((n_images, *SHAPE), generator=gen, device=device)
    y = torch.randint(0, CLASSES, (n_images,), generator=gen, device=device)
    b = min(profile["eval_batch_size"], n_images)
    _reset_peak(device)
    _synchronize(device)
    t0 = time.perf_counter()
    generate("pgd", model, x, y, batch_size=b, eps=8 / 255, alpha=2 / 255, steps=steps)
    _synchronize(device)
    seconds = time.perf_counter() - t0
    return {"work": f"PGD-{steps} on the CIFAR-10 classifier", "images": n_images, "batch": b, "seconds": seconds,
            "images/s": n_images / seconds, "peak memory": memory.gigabytes(_peak(device))}


def run(tiny: bool = False, device: torch.device | None = None, profile: str = "paper") -> pd.DataFrame:
    """Every row of the check; `tiny`: the networks narrowed (TINY), 2 batches of 4 images per training and PGD-2
    on 8 images."""
    device = device or get_device()
    settings = load_profile(profile, TINY if tiny else None)
    rows = [time_epoch(job, device, *((8, 4) if tiny else (None, None))) for job in jobs(settings, device)]
    rows.append(time_pgd(settings, device, *((8, 2) if tiny else (PGD_IMAGES, PGD_STEPS))))
    return pd.DataFrame(rows).assign(device=_device_name(device))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="narrow networks, 2 batches of 4 images per training, "
                        "PGD-2 on 8 images: checks the code in seconds on a CPU, measures nothing")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    args = parser.parse_args(argv)
    try:
        device = get_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    table = run(args.tiny, device)
    print(table.to_markdown(index=False, floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
