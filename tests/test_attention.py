"""lib.attention: activation maps and statistics against hand computations, Grad-CAM following the evidence,
attention retention on hand-made maps, and the figures' titles and labels."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lib import attention  # noqa: E402


class _SignSplit(nn.Module):
    """conv 1x1 with weights (+1, -1) -> ReLU -> global average pool -> linear: activations known by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.conv.weight.data = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class _LeftHalf(nn.Module):
    """conv 1x1 (weight 1) -> ReLU, logits (s, -s) with s the sum of the activation's left half: the evidence for
    class 0 is exactly the left half of the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.conv.weight.data.fill_(1.0)
        self.relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.conv(x))
        s = a[..., : a.shape[-1] // 2].flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_layer_activation_maps_are_channel_means_of_spatial_layers(digits_model, digits_batch):
    x = digits_batch[0][:5]
    maps = attention.layer_activation_maps(digits_model, x)
    body = digits_model.body
    first = body[:2](digits_model.normalize(x)).mean(1)        # conv -> ReLU, channel mean
    second = body[:4](digits_model.normalize(x)).mean(1)
    assert list(maps) == ["body.1", "body.3"]                  # the ReLU after Flatten/Linear is not spatial
    torch.testing.assert_close(maps["body.1"], first)
    torch.testing.assert_close(maps["body.3"], second)
    assert maps["body.1"].shape == (5, 8, 8)


def test_layer_activation_maps_refuses_unknown_or_non_spatial_layers(digits_model, digits_batch):
    x = digits_batch[0][:2]
    with pytest.raises(ValueError, match="unknown layer"):
        attention.layer_activation_maps(digits_model, x, ["nope"])
    with pytest.raises(ValueError, match="spatial"):
        attention.layer_activation_maps(digits_model, x, ["body.7"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attention.layer_activation_maps(digits_model, x * 2 + 0.5)


def test_activation_statistics_match_eq7_by_hand():
    model = _SignSplit()
    benign = torch.zeros(2, 1, 2, 2)
    benign[0, 0] = torch.tensor([[0.2, 0.4], [0.0, 0.6]])
    benign[1, 0] = torch.tensor([[0.1, 0.1], [0.3, 0.1]])
    doubled = (benign * 1.5).clamp(0, 1)
    table = attention.activation_statistics(model, {"benign": benign, "adversarial": doubled})
    assert isinstance(table, pd.DataFrame)
    relu = table[table["layer"] == "relu"].set_index("kind")
    pool = table[table["layer"] == "pool"].set_index("kind")
    # ReLU layer: channel maxima are (max x, 0) -> V = max x; mean over the two images
    assert relu.loc["benign", "V"] == pytest.approx((0.6 + 0.3) / 2)
    assert relu.loc["adversarial", "V"] == pytest.approx((0.9 + 0.45) / 2)
    assert relu.loc["adversarial", "ratio to benign"] == pytest.approx(1.5)
    assert relu.loc["benign", "ratio to benign"] == pytest.approx(1.0)
    # global average pool: (mean x, 0) -> V = mean x
    assert pool.loc["benign", "V"] == pytest.approx((0.3 + 0.15) / 2)
    with pytest.raises(ValueError, match="reference"):
        attention.activation_statistics(model, {"adversarial": doubled})


def test_attention_retention_on_hand_made_maps():
    benign = torch.tensor([[[1.0, 0.2], [0.6, 0.0]]])
    other = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    region = attention.benign_region(benign, 0.5)
    assert region.tolist() == [[[True, False], [True, False]]]
    assert attention.attention_retention(benign, other, 0.5).tolist() == [pytest.approx(0.5)]
    assert attention.attention_retention(benign, benign, 0.5).item() == pytest.approx(1.6 / 1.8)
    assert math.isnan(attention.attention_retention(benign, torch.zeros_like(benign)).item())
    row = attention.retention_row(benign, {"moved": other})
    assert row == {"benign (own share)": pytest.approx(1.6 / 1.8), "moved": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="differ"):
        attention.attention_retention(benign, other[:, :1])
    with pytest.raises(ValueError, match="non-negative"):
        attention.attention_retention(benign, -other)
    with pytest.raises(ValueError, match="threshold"):
        attention.benign_region(benign, 0.0)


def test_grad_cam_follows_the_evidence_and_retention_drops_when_it_moves():
    model = _LeftHalf().eval()
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 1:4, 0:3] = 1.0                       # evidence top-left
    x[1, 0, 5:8, 1:4] = 1.0                       # evidence bottom-left
    maps = attention.attention(model, x, torch.tensor([0, 0]))
    assert maps.shape == (2, 8, 8) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert maps[0, 1:4, 0:3].sum() / maps[0].sum() > 0.9
    assert maps[1, 5:8, 1:4].sum() / maps[1].sum() > 0.9
    # same evidence: retention equals the benign map's own share; moved evidence: almost nothing retained
    same = attention.attention_retention(maps[:1], maps[:1])
    moved = attention.attention_retention(maps[:1], maps[1:])
    assert same.item() > 0.9 and moved.item() < 0.1


def test_attention_defaults_to_the_predicted_class(digits_model, digits_batch):
    x = digits_batch[0][:6]
    default = attention.attention(digits_model, x)
    explicit = attention.attention(digits_model, x, digits_model(x).argmax(1))
    torch.testing.assert_close(default, explicit)


def _title(fig) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else fig.axes[0].get_title()


def test_figures_name_dataset_attack_eps_and_label_axes(digits_model, digits_batch):
    x = digits_batch[0][:2]
    x_adv = (x + 0.1).clamp(0, 1)
    kinds = {"benign": x, "adversarial": x_adv}
    maps = {k: attention.layer_activation_maps(digits_model, v) for k, v in kinds.items()}
    stats = attention.activation_statistics(digits_model, kinds)
    cams = {k: attention.attention(digits_model, v) for k, v in kinds.items()}
    row = attention.retention_row(cams["benign"], {"adversarial": cams["adversarial"], "purified": cams["benign"]})
    table = pd.DataFrame([{"defense": "median", **row}])
    figs = [attention.activation_maps_figure(maps, dataset="digits", attack="FGSM", eps=0.1),
            attention.activation_statistics_figure(stats, dataset="digits", attack="FGSM", eps=0.1),
            attention.attention_figure(kinds, cams, ["a", "b"], dataset="digits", attack="FGSM", eps=0.1,
                                       predictions={"benign": ["1", "2"], "adversarial": ["3", "4"]}),
            attention.retention_figure(table, dataset="digits", attack="FGSM", eps=0.1)]
    for fig in figs:
        assert "digits" in _title(fig) and "FGSM" in _title(fig) and "ε=0.1" in _title(fig)
        assert any(ax.get_xlabel() for ax in fig.axes) and any(ax.get_ylabel() for ax in fig.axes)
        plt.close(fig)
