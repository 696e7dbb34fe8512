"""Bad inputs at every public entry point: each gets one clear error naming the parameter, nothing is accepted.

One table of (entry point, bad input) -> (error type, fragment of the message). The fragment names the parameter
(and, where it matters, the value or what is allowed), so an error from deep inside torch, OpenCV or PyYAML, or a
silent result, fails the case.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable

import torch
from torch import nn

from lib import attacks, runner
from lib.attacks.autoattack import autoattack
from lib.data import balanced_subset, load_dataset
from lib.defenses.arn.defense import Purifier
from lib.defenses.arn.networks import ARNAutoencoder
from lib.defenses.base import Compose, NoDefense
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization
from lib.defenses.idfr.defense import InputDenoising
from lib.defenses.idfr.networks import InputDenoiser
from lib.defenses.reconstruction.defense import (
    PixelDepthCompression,
    ReconstructionDefense,
)
from lib.defenses.reconstruction.networks import EDSRRestorer
from lib.defenses.sfm.defense import SFMDefense
from lib.defenses.sfm.networks import AttentionUNet
from lib.defenses.squeeze import BitDepthReduction, MedianFilter, NonLocalMeans
from lib.evaluate import attack_specs
from lib.profiles import load_profile
from lib.profiles.schema import read_profile

N, CLASSES = 4, 10
X = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 3, 5, 9])
MODEL = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES)).eval()

BAD_IMAGES = {                                   # name -> (bad x, message fragment)
    "nan": (X.clone().index_put_((torch.tensor(0),), torch.tensor(float("nan"))), "must be finite"),
    "inf": (X.clone().index_put_((torch.tensor(1),), torch.tensor(float("inf"))), "must be finite"),
    "0-255": (X * 255, "must lie in [0, 1]"),
    "negative": (X - 0.5, "must lie in [0, 1]"),
    "uint8": ((X * 255).to(torch.uint8), "floating-point"),
    "rank 3": (X[0], "(N, C, H, W)"),
    "empty": (X[:0], "is empty"),
    "ndarray": (X.numpy(), "must be a torch.Tensor"),
}
BAD_LABELS = {                                   # name -> (bad y, message fragment)
    "y = 10": (torch.tensor([0, 3, 5, 10]), "labels in [0, 9]"),
    "y = -1": (torch.tensor([0, -1, 5, 9]), "labels in [0, 9]"),
    "boolean": (torch.tensor([True, False, True, False]), "integer class labels"),
    "float": (Y.float(), "integer class labels"),
    "wrong length": (Y[:3], "1-D tensor of 4 labels"),
    "2-D": (Y[:, None], "1-D tensor of 4 labels"),
}


def _defenses() -> dict[str, Any]:
    """One of each defense class of the registry, untrained and tiny (validation does not depend on weights)."""
    return {
        "none": NoDefense(), "compose": Compose(NoDefense()), "bit_depth": BitDepthReduction(5),
        "median": MedianFilter(2), "nlm": NonLocalMeans(), "jpeg": JPEGCompression(75),
        "tvm": TotalVariationMinimization(max_iter=2), "arn": Purifier(ARNAutoencoder(1, 8, widths=(4, 8, 8), latent=4)),
        "idfr": InputDenoising(InputDenoiser(1, width=0.25)), "sfm": SFMDefense(AttentionUNet(1, base_width=4, depth=2)),
        "reconstruction": ReconstructionDefense(EDSRRestorer(1, 4, 1), 4), "compression": PixelDepthCompression(4),
    }


def _runner(*argv: str) -> None:
    """lib.runner's command line as a function: its usage error (exit status 2) raised as the ValueError it prints."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = runner.main(list(argv))
    if status == 2:
        raise ValueError(err.getvalue())
    raise AssertionError(f"runner accepted {argv} (exit status {status})")


def _profile_file(tmp_path, text: str) -> Callable[[], Any]:
    """read_profile of a profile file bad.yaml (one folder per case) holding `text`."""
    folder = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    folder.mkdir()
    path = folder / "bad.yaml"
    path.write_text(text)
    return lambda: read_profile(path)


SMOKE_TOP = "name: smoke\nseed: 0\ndatasets: {}\nnotebooks: {}\n"


def cases(tmp_path) -> list[tuple[str, Callable[[], Any], type[Exception], str]]:
    """(case, call, expected error type, fragment of its message) for every public entry point."""
    table: list[tuple[str, Callable[[], Any], type[Exception], str]] = []
    # attacks: the registry's dispatch, AutoAttack's wrapper and each attack function
    for name, (x, frag) in BAD_IMAGES.items():
        table.append((f"generate x {name}", lambda x=x: attacks.generate("fgsm", MODEL, x, Y, eps=0.1), ValueError,
                      frag))
    for name, (y, frag) in BAD_LABELS.items():
        table.append((f"generate {name}", lambda y=y: attacks.generate("pgd", MODEL, X, y, eps=0.1, steps=1),
                      ValueError, frag))
        table.append((f"autoattack {name}", lambda y=y: autoattack(MODEL, X, y, eps=0.1, version="custom",
                                                                    attacks=["apgd-ce"], n_iter=1), ValueError, frag))
    for attack, params in (("fgsm", {"eps": 0.1}), ("bim", {"eps": 0.1, "steps": 1}), ("mi_fgsm", {"eps": 0.1}),
                           ("di_fgsm", {"eps": 0.1}), ("pgd_l2", {"eps": 1.0}), ("cw_l2", {"steps": 1}),
                           ("deepfool", {"steps": 1}), ("ddn", {"steps": 1}), ("stadv", {"steps": 1})):
        table.append((f"{attack} y = 10", lambda a=attack, p=params: attacks.ATTACKS[a](
            MODEL, X, BAD_LABELS["y = 10"][0], **p), ValueError, "y must hold class labels in [0, 9]"))
        table.append((f"{attack} x 0-255", lambda a=attack, p=params: attacks.ATTACKS[a](MODEL, X * 255, Y, **p),
                      ValueError, "x must lie in [0, 1]"))
    table += [
        ("autoattack x nan", lambda: autoattack(MODEL, BAD_IMAGES["nan"][0], Y, eps=0.1), ValueError, "x must be finite"),
        ("autoattack norm", lambda: autoattack(MODEL, X, Y, eps=0.1, norm="L3"), ValueError, "norm must be one of"),
        ("autoattack version", lambda: autoattack(MODEL, X, Y, eps=0.1, version="fast"), ValueError,
         "version must be one of"),
        ("generate unknown attack", lambda: attacks.generate("pgdd", MODEL, X, Y), ValueError,
         "unknown attack 'pgdd'; valid names: autoattack"),
        ("generate non-string attack", lambda: attacks.generate(["pgd"], MODEL, X, Y), ValueError, "unknown attack"),
        ("generate misspelt parameter", lambda: attacks.generate("pgd", MODEL, X, Y, eps=0.1, step=3), ValueError,
         "has no parameter 'step'"),
        ("generate batch_size 0", lambda: attacks.generate("fgsm", MODEL, X, Y, eps=0.1, batch_size=0), ValueError,
         "batch_size must be an integer >= 1, got 0"),
        ("fgsm eps -1", lambda: attacks.fgsm(MODEL, X, Y, eps=-1), ValueError, "eps must be a finite number >= 0"),
        ("fgsm eps nan", lambda: attacks.fgsm(MODEL, X, Y, eps=float("nan")), ValueError, "eps must be a finite"),
        ("fgsm eps string", lambda: attacks.fgsm(MODEL, X, Y, eps="0.1"), ValueError, "eps must be a finite number"),
        ("pgd steps 0", lambda: attacks.pgd(MODEL, X, Y, eps=0.1, steps=0), ValueError, "steps must be an integer >= 1"),
        ("pgd steps 1.5", lambda: attacks.pgd(MODEL, X, Y, eps=0.1, steps=1.5), ValueError, "steps must be an integer"),
        ("pgd steps True", lambda: attacks.pgd(MODEL, X, Y, eps=0.1, steps=True), ValueError,
         "steps must be an integer >= 1, got True"),
        ("pgd norm", lambda: attacks.pgd(MODEL, X, Y, eps=0.1, norm="l3"), ValueError, "norm must be one of"),
        ("pgd loss", lambda: attacks.pgd(MODEL, X, Y, eps=0.1, loss="mse"), ValueError, "loss must be one of"),
        ("model without logits", lambda: attacks.fgsm(lambda x: x, X, Y, eps=0.1), ValueError,
         "model must return logits of shape (N, classes)"),
    ]
    # defenses: every defense's purify
    for defense_name, defense in _defenses().items():
        for name, (x, frag) in BAD_IMAGES.items():
            table.append((f"{defense_name}.purify x {name}", lambda d=defense, x=x: d.purify(x), ValueError, frag))
    # data
    table += [
        ("load_dataset n=0", lambda: load_dataset("digits", "test", n=0), ValueError, "n must be an integer >= 1, got 0"),
        ("load_dataset n=-5", lambda: load_dataset("digits", "test", n=-5), ValueError, "n must be an integer >= 1"),
        ("load_dataset n=1.5", lambda: load_dataset("digits", "test", n=1.5), ValueError, "n must be an integer"),
        ("load_dataset n=True", lambda: load_dataset("digits", "test", n=True), ValueError, "n must be an integer"),
        ("load_dataset n='10'", lambda: load_dataset("digits", "test", n="10"), ValueError, "n must be an integer"),
        ("load_dataset n too large", lambda: load_dataset("digits", "test", n=10_000), ValueError,
         "n must be at most the 360 examples"),
        ("load_dataset name", lambda: load_dataset("digitz"), ValueError, "unknown dataset 'digitz'; valid datasets"),
        ("load_dataset split", lambda: load_dataset("digits", "val"), ValueError, "unknown split 'val'; valid splits"),
        ("load_dataset image_size 0", lambda: load_dataset("digits", "test", image_size=0), ValueError,
         "image_size must be an integer >= 1"),
        ("load_dataset channels 0", lambda: load_dataset("digits", "test", channels=0), ValueError,
         "channels must be an integer >= 1"),
        ("balanced_subset n=0", lambda: balanced_subset(Y, 0), ValueError, "n must be an integer >= 1"),
    ]
    # profiles: the file (schema), load_profile's name and overrides
    table += [
        ("profile empty file", _profile_file(tmp_path, ""), ValueError, "bad.yaml is empty"),
        ("profile list file", _profile_file(tmp_path, "- smoke\n- quick\n"), ValueError,
         "bad.yaml: the file must be a mapping"),
        ("profile invalid YAML", _profile_file(tmp_path, "name: [smoke\n"), ValueError, "bad.yaml is not valid YAML"),
        ("profile missing key", _profile_file(tmp_path, "name: smoke\n"), ValueError,
         "lacks the required setting(s) seed"),
        ("profile unknown top-level key", _profile_file(tmp_path, SMOKE_TOP + "sed: 1\n"), ValueError,
         "bad.yaml: unknown setting 'sed'"),
        ("profile seed string", _profile_file(tmp_path, SMOKE_TOP.replace("seed: 0", "seed: '0'")), ValueError,
         "bad.yaml: seed must be an integer, got '0'"),
        ("profile seed boolean", _profile_file(tmp_path, SMOKE_TOP.replace("seed: 0", "seed: true")), ValueError,
         "seed must be an integer, got True"),
        ("profile datasets list", _profile_file(tmp_path, SMOKE_TOP.replace("datasets: {}", "datasets: [digits]")),
         ValueError, "datasets must be a mapping"),
        ("profile dataset key", _profile_file(tmp_path, SMOKE_TOP.replace(
            "datasets: {}", "datasets: {digits: {test_sise: 10}}")), ValueError, "unknown setting 'datasets.digits.test_sise'"),
        ("profile test_size type", _profile_file(tmp_path, SMOKE_TOP.replace(
            "datasets: {}", "datasets: {digits: {test_size: ten}}")), ValueError, "datasets.digits.test_size must be"),
        ("profile classifier key", _profile_file(tmp_path, SMOKE_TOP.replace(
            "datasets: {}", "datasets: {digits: {classifier: {arch: smallcnn, epoch: 3}}}")), ValueError,
         "unknown setting 'datasets.digits.classifier.epoch'"),
        ("profile classifier lr type", _profile_file(tmp_path, SMOKE_TOP.replace(
            "datasets: {}", "datasets: {digits: {classifier: {arch: smallcnn, lr: fast}}}")), ValueError,
         "datasets.digits.classifier.lr must be a number"),
        ("profile notebook name", _profile_file(tmp_path, SMOKE_TOP.replace(
            "notebooks: {}", "notebooks: {01_sfm: {}}")), ValueError, "notebooks.01_sfm is not a notebook of the series"),
        ("profile notebook section list", _profile_file(tmp_path, SMOKE_TOP.replace(
            "notebooks: {}", "notebooks: {01_sfm_defense: [1]}")), ValueError,
         "notebooks.01_sfm_defense must be a mapping"),
        ("profile attack name", _profile_file(tmp_path, SMOKE_TOP.replace(
            "notebooks: {}", "notebooks: {00_setup_and_data: {attacks: [{name: pgdd, params: {eps: 0.1}}]}}")),
         ValueError, "notebooks.00_setup_and_data.attacks[0]: unknown attack 'pgdd'; valid names"),
        ("profile attack parameter", _profile_file(tmp_path, SMOKE_TOP.replace(
            "notebooks: {}", "notebooks: {00_setup_and_data: {attacks: [{name: pgd, params: {epss: 0.1}}]}}")),
         ValueError, "attacks[0]: attack 'pgd' has no parameter 'epss'"),
        ("profile attack entry key", _profile_file(tmp_path, SMOKE_TOP.replace(
            "notebooks: {}", "notebooks: {00_setup_and_data: {attacks: [{name: pgd, parms: {}}]}}")),
         ValueError, "attacks[0] has unknown key(s) parms"),
        ("profile attack entry without name", _profile_file(tmp_path, SMOKE_TOP.replace(
            "notebooks: {}", "notebooks: {00_setup_and_data: {attacks: [{name: fgsm}, {nme: pgd}]}}")),
         ValueError, "attacks[1] must be a mapping with at least 'name'"),
        ("load_profile unknown", lambda: load_profile("fast"), ValueError, "unknown profile 'fast'; valid profiles"),
        ("load_profile not a string", lambda: load_profile(3), ValueError, "unknown profile 3"),
        ("override misspelt key", lambda: load_profile("smoke", {"datasets.digits.test_siz": 7}), ValueError,
         "override 'datasets.digits.test_siz': datasets.digits has no setting 'test_siz'"),
        ("override misspelt section", lambda: load_profile("smoke", {"datasets.digit.test_size": 7}), ValueError,
         "override 'datasets.digit.test_size': 'digit' is not a section"),
        ("override wrong type", lambda: load_profile("smoke", {"seed": "zero"}), ValueError,
         "seed must be an integer, got 'zero'"),
        ("override non-string key", lambda: load_profile("smoke", {3: 1}), ValueError, "override keys must be dotted"),
        ("overrides not a mapping", lambda: load_profile("smoke", [("seed", 1)]), ValueError,
         "overrides must be a mapping"),
    ]
    # attack lists of a profile, turned into AttackSpecs
    table += [
        ("attack_specs unknown name", lambda: attack_specs([{"name": "fgsmm"}]), ValueError,
         "attack entry 0: unknown attack 'fgsmm'; valid names"),
        ("attack_specs not a list", lambda: attack_specs({"name": "fgsm"}), ValueError,
         "entries must be a list of attack mappings"),
        ("attack_specs entry string", lambda: attack_specs(["fgsm"]), ValueError,
         "attack entry 0 must be a mapping with at least 'name'"),
        ("attack_specs params list", lambda: attack_specs([{"name": "fgsm", "params": [0.1]}]), ValueError,
         "attack entry 0.params must be a mapping"),
        ("attack_specs label number", lambda: attack_specs([{"name": "fgsm", "label": 3}]), ValueError,
         "attack entry 0.label must be a string"),
        ("attack_specs negative l2_budget", lambda: attack_specs([{"name": "cw_l2", "l2_budget": -1}]), ValueError,
         "attack entry 0.l2_budget must be a finite number >= 0"),
    ]
    # runner options
    table += [
        ("runner --only ,", lambda: _runner("--profile", "smoke", "--only", ","), ValueError, "--only ',' has an empty"),
        ("runner --only 00,", lambda: _runner("--profile", "smoke", "--only", "00,"), ValueError, "empty notebook prefix"),
        ("runner --only ''", lambda: _runner("--profile", "smoke", "--only", ""), ValueError, "empty notebook prefix"),
        ("runner --only 77", lambda: _runner("--profile", "smoke", "--only", "77"), ValueError,
         "--only 77 matches no notebook"),
        ("runner --profile huge", lambda: _runner("--profile", "huge"), ValueError, "unknown profile 'huge'"),
        ("notebook_timeout_s 0", lambda: runner.notebook_timeout({"name": "p", "notebook_timeout_s": 0}), ValueError,
         "notebook_timeout_s must be a number of seconds > 0"),
    ]
    return table


def test_every_bad_input_gets_one_clear_error(tmp_path, capsys):
    """Every case raises the expected error with a message naming the parameter; none is accepted silently."""
    table = cases(tmp_path)
    clear, unclear, accepted = [], [], []
    for name, call, error, fragment in table:
        try:
            call()
        except error as exc:
            (clear if fragment in str(exc) else unclear).append((name, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - an error of another type is an unclear error
            unclear.append((name, f"{type(exc).__name__}: {exc}"))
        else:
            accepted.append(name)
    with capsys.disabled():
        print(f"\nbad inputs: {len(table)} cases, {len(clear)} clear errors, {len(unclear)} unclear errors, "
              f"{len(accepted)} silent acceptances")
    assert not unclear and not accepted, {"unclear": unclear, "accepted": accepted}
    assert len({name for name, *_ in table}) == len(table)   # every case is named once
