"""The GPU check's Python half (lib.gpu_check): its tiny mode runs every row on the CPU in seconds, and its full
mode takes the paper profile's networks, training-set sizes and batch sizes."""
from __future__ import annotations

import pytest
import torch

from lib import gpu_check
from lib.profiles import load_profile


def test_tiny_mode_prints_every_row_on_the_cpu(capsys):
    assert gpu_check.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("SFM Attention U-Net", "IDFR input denoiser", "EDSR (2 blocks x 8)", "ARN autoencoder", "PGD-2"):
        assert name in out, name
    table = gpu_check.run(tiny=True, device=torch.device("cpu"))
    assert len(table) == 5 and (table["seconds"] > 0).all() and (table["images"] == 8).all()
    assert table["device"].str.startswith("cpu").all()


def test_full_mode_uses_the_paper_profiles_sizes():
    paper = load_profile("paper")
    by_name = {job.name.split(" (")[0].split(" through")[0]: job for job in gpu_check.jobs(paper, torch.device("cpu"))}
    sfm = paper["notebooks"]["01_sfm_defense"]
    assert (by_name["SFM Attention U-Net"].n_train, by_name["SFM Attention U-Net"].batch_size) == (
        50_000 - sfm["val_size"], sfm["sfm"]["batch_size"])
    assert by_name["IDFR input denoiser"].batch_size == paper["notebooks"]["02_idfr"]["id"]["batch_size"]
    assert by_name["EDSR"].batch_size == paper["notebooks"]["04_image_reconstruction"]["restorer"]["batch_size"]
    arn = by_name["ARN autoencoder + attack and image discriminators"]
    assert arn.batch_size == paper["notebooks"]["05_attack_invariant_arn"]["arn"]["batch_size"] and arn.n_train == 50_000
    masker = by_name["SFM Attention U-Net"].modules[0]
    assert 30e6 < sum(p.numel() for p in masker.parameters()) < 40e6   # the paper's b = 64, d = 5 (about 35 M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_is_a_clear_error(capsys):
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
