"""The committed reference denoiser (engines/models/reference-redcnn.onnx) on held-out simulated slices.

The test simulates its own held-out slices (engines.train.data.heldout_sites: phantom seeds and z
positions never used in training) with the training chain: phantom -> host-twin fan-beam projector
-> Poisson + electronic noise at full dose (2e5 photons/element/view) and, independently, at a quarter
of it -> FBP (Hann).  The quarter-dose FBP goes through the ONNX file with ONNX Runtime; every score is
taken against the full-dose FBP of the same slice, which is what the network was trained to reproduce
(not the noise-free phantom: the quarter-dose FBP carries its own photon-starvation bias of up to
+2 HU in the liver, which the full-dose reference largely lacks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.card import load_card
from engines.train.data import SCORED_REGIONS, heldout_sites, score_denoiser, simulate_pair

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the committed ONNX model")

CARD = Path(__file__).resolve().parents[2] / "engines" / "models" / "reference-redcnn.toml"


def _session(onnx_path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model():
    card, onnx_path = load_card(CARD)
    return card, onnx_path, _session(onnx_path)


@pytest.fixture(scope="module")
def heldout(model):
    """Held-out pairs, the network input (normalised per the card) and the denoised HU slices."""
    card, _, session = model
    pairs = [simulate_pair(site) for site in heldout_sites()]  # not the training cache: simulated here
    x = np.stack([card.normalization.to_network(p.low_dose_hu) for p in pairs])[:, None]
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    denoised = [card.from_network(yi[0], p.low_dose_hu) for p, yi in zip(pairs, y)]
    return pairs, x, y, denoised, score_denoiser(pairs, denoised)


def test_card_loads_with_matching_sha256_and_describes_the_onnx_graph(model):
    card, onnx_path, session = model
    assert card.name == "reference-redcnn" and not card.clinical_use
    assert "not for clinical use" in card.intended_use.lower()
    assert card.input.channels == 1 and card.output.meaning == "residual"
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("hu_norm", "tensor(float)", "residual")
    # Fully convolutional: any batch and slice size in, the same size out.
    (y,) = session.run(None, {"hu_norm": np.zeros((2, 1, 96, 80), np.float32)})
    assert y.shape == (2, 1, 96, 80)


def test_noise_std_in_liver_muscle_and_fat_drops_by_at_least_40_percent(heldout):
    scores = heldout[-1]["regions"]
    assert set(scores) >= set(SCORED_REGIONS)
    for name in SCORED_REGIONS:
        r = scores[name]
        assert r["noise_std_reduction"] >= 0.40, (
            f"{name}: std {r['std_low_hu']:.1f} -> {r['std_denoised_hu']:.1f} HU, "
            f"down by only {r['noise_std_reduction']:.0%}")


def test_region_means_stay_within_2_hu_of_the_full_dose_reference(heldout):
    # Mean over all the region's pixels in the held-out slices of (denoised - full-dose FBP), HU.
    scores = heldout[-1]["regions"]
    for name in SCORED_REGIONS:
        shift = scores[name]["mean_shift_hu"]
        assert abs(shift) <= 2.0, f"{name}: mean moved {shift:+.2f} HU from the full-dose reference"


def test_psnr_over_the_body_gains_at_least_3_db_on_every_heldout_slice(heldout):
    # PSNR against the full-dose FBP over the body (all tissue but outside air and table), peak 1000 HU.
    for s in heldout[-1]["slices"]:
        assert s["psnr_gain_db"] >= 3.0, (
            f"seed {s['phantom_seed']} z {s['z_mm']} mm: PSNR {s['psnr_low_db']:.2f} -> "
            f"{s['psnr_denoised_db']:.2f} dB, gain {s['psnr_gain_db']:.2f} dB")


def test_card_scores_are_the_heldout_measurement(model, heldout):
    card, scores = model[0], heldout[-1]["card"]
    assert card.scores.noise_std_reduction == pytest.approx(scores["noise_std_reduction"], abs=0.01)
    assert card.scores.mean_shift_hu == pytest.approx(scores["mean_shift_hu"], abs=0.1)
    assert card.scores.psnr_gain_db == pytest.approx(scores["psnr_gain_db"], abs=0.05)


def test_onnx_runtime_output_matches_the_pytorch_forward_of_the_same_weights(model, heldout):
    torch = pytest.importorskip("torch", reason="torch (training only) is not installed; ONNX vs PyTorch not checked")
    onnx = pytest.importorskip("onnx", reason="onnx is needed to read the weights out of the ONNX file")
    from onnx import numpy_helper

    from engines.train.model import ResidualDenoiser

    card, onnx_path, _ = model
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
               for t in onnx.load(str(onnx_path)).graph.initializer}
    depth = len(weights) // 2
    net = ResidualDenoiser(card.input.channels, weights["layers.0.weight"].shape[0], depth)
    net.load_state_dict(weights, strict=True)
    net.eval()
    _, x, y_onnx, _, _ = heldout
    torch.set_num_threads(2)
    with torch.no_grad():
        y_torch = net(torch.from_numpy(x)).numpy()
    diff_hu = float(np.abs(y_torch - y_onnx).max()) * card.normalization.scale_hu
    assert diff_hu <= 0.5, f"ONNX Runtime and PyTorch differ by up to {diff_hu:.3f} HU"
