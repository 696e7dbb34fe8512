"""lib.adversarial_training: the adversarial-training losses used by fit_classifier."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.adversarial_training import kurakin_training_loss


def test_kurakin_training_loss_with_zero_budget_is_the_weighted_clean_loss(digits_batch):
    x, y = digits_batch
    x, y = x[:32], y[:32]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.manual_seed(0)
    for kind in ("fgsm", "bim"):
        loss = kurakin_training_loss(kind, sigma=0.0)(model, x, y)
        expected = (F.cross_entropy(model(x[:16]), y[:16]) + 0.3 * F.cross_entropy(model(x[16:]), y[16:])) / 1.3
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
        loss.backward()
    with pytest.raises(ValueError, match="adversarial training"):
        kurakin_training_loss("pgd")
