"""The training recipe of the reference denoiser: simulate (or read back) the pairs, train, export, score, card.

    python -m engines.train.train --out engines/models --seed 0

1. Training pairs: `data.training_sites` (20 phantom seeds x 4 z strata over 0-380 mm = 80 slices,
   256 x 256, 1.56 mm pixels), quarter-dose FBP in, full-dose FBP out; cached in /tmp.
2. Random 64 x 64 patches centred inside the body, mirrored left-right half of the time; loss = mean
   squared error between the estimated and the actual noise (low dose - full dose) in normalised units
   (HU / 1000), plus 8 x that of its 16 x 16 block means (`noise_loss`); Adam, batch 16, learning rate
   cosine-annealed from ``--lr`` to 1 % of it, a fixed step count (15 epochs x 200 steps).
3. Every epoch: the training loss and the held-out RMSE over the body, both in HU (logged, never used
   to select weights: the exported weights are the last step's).
4. Export ONNX (opset 17, input ``hu_norm`` (N, 1, H, W), output ``residual`` (N, 1, H, W), N/H/W
   dynamic), run the exported file with ONNX Runtime on the held-out slices, score it
   (`data.score_denoiser`), write ``<name>.scores.json`` and the card ``<name>.toml`` (with the ONNX
   file's sha256) beside it, and load the card back with `engines.card.load_card`.

Everything is seeded (``--seed``); runs on the CPU with ``--threads`` (default 2) threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from engines.card import ModelCard, Normalization, file_sha256, load_card
from engines.train.data import (ScanProtocol, SlicePair, body_mask, heldout_sites, load_pair, score_denoiser,
                                training_sites)

NAME = "reference-redcnn"
VERSION = "1.0.0"
INPUT_NAME, OUTPUT_NAME = "hu_norm", "residual"
OPSET = 17
NORMALIZATION = Normalization()  # (clip(HU, -1024, 3071) - 0) / 1000


def _log(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def load_pairs(sites, protocol: ScanProtocol) -> list[SlicePair]:
    return [load_pair(site, protocol) for site in sites]


class PatchSampler:
    """Random (input, target noise) patches from the training pairs, normalised units, (B, 1, P, P)."""

    def __init__(self, pairs: list[SlicePair], protocol: ScanProtocol, patch: int, rng: np.random.Generator):
        self.inputs = np.stack([NORMALIZATION.to_network(p.low_dose_hu) for p in pairs])
        self.noise = np.stack([(p.low_dose_hu - p.full_dose_hu) / NORMALIZATION.scale_hu for p in pairs])
        self.noise = self.noise.astype(np.float32)
        # patch centres: any body pixel, so the skin line and the air beside it are seen too
        self.centres = [np.argwhere(body_mask(p.site, protocol)) for p in pairs]
        self.patch, self.rng = patch, rng

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        n_slices, rows, cols = self.inputs.shape
        x = np.empty((size, 1, self.patch, self.patch), np.float32)
        y = np.empty_like(x)
        half = self.patch // 2
        for b in range(size):
            s = int(self.rng.integers(n_slices))
            cy, cx = self.centres[s][self.rng.integers(len(self.centres[s]))]
            top = int(np.clip(cy - half, 0, rows - self.patch))
            left = int(np.clip(cx - half, 0, cols - self.patch))
            win = np.s_[top:top + self.patch, left:left + self.patch]
            xi, yi = self.inputs[s][win], self.noise[s][win]
            if self.rng.random() < 0.5:  # a mirrored patient: same physics, other anatomy
                xi, yi = xi[:, ::-1], yi[:, ::-1]
            x[b, 0], y[b, 0] = xi, yi
        return x, y


def noise_loss(estimate, noise, mean_weight: float, pool: int):
    """(loss, its first term): mean squared error of the noise estimate, plus ``mean_weight`` times that of
    its ``pool`` x ``pool`` block means.  The block means are what a region's mean HU sees, and plain MSE
    under-weights them: trained on MSE alone, the network moved the liver mean 1.5 HU below the full-dose
    reference (a constant offset costs little next to the 35 HU noise around it).  Both terms have the same
    minimiser (the conditional mean of the noise); the second only spends more of the capacity on it."""
    import torch.nn.functional as F

    err = estimate - noise
    mse = (err**2).mean()
    return mse + mean_weight * (F.avg_pool2d(err, pool) ** 2).mean(), mse


def denoise_torch(model, pairs: list[SlicePair]) -> list[np.ndarray]:
    """Denoised HU slices from the PyTorch model (the card's residual convention)."""
    import torch

    x = torch.from_numpy(np.stack([NORMALIZATION.to_network(p.low_dose_hu) for p in pairs])[:, None])
    with torch.no_grad():
        y = model(x).numpy()[:, 0]
    return [p.low_dose_hu - yi * NORMALIZATION.scale_hu for p, yi in zip(pairs, y)]


def denoise_onnx(onnx_path: Path, pairs: list[SlicePair], threads: int) -> list[np.ndarray]:
    """Denoised HU slices from the exported ONNX file, run with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = np.stack([NORMALIZATION.to_network(p.low_dose_hu) for p in pairs])[:, None]
    (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return [p.low_dose_hu - yi[0] * NORMALIZATION.scale_hu for p, yi in zip(pairs, y)]


def body_rmse_hu(pairs: list[SlicePair], images: list[np.ndarray]) -> float:
    sq = [((img - p.full_dose_hu)[body_mask(p.site)] ** 2).mean() for p, img in zip(pairs, images)]
    return float(np.sqrt(np.mean(sq)))


def export_onnx(model, path: Path) -> None:
    import torch

    model.eval()
    dummy = torch.zeros(1, model.in_channels, 64, 64)
    dynamic = {0: "N", 2: "H", 3: "W"}
    # The TorchScript exporter (dynamo=False): it takes dynamic_axes directly and needs no onnxscript; a
    # graph of convolutions and ReLUs is all it has to handle.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
                          do_constant_folding=True)


def write_card(out: Path, onnx_path: Path, scores: dict, protocol: ScanProtocol, n_train: int) -> Path:
    import tomli_w

    card = ModelCard(
        name=NAME, version=VERSION, onnx=onnx_path.name, sha256=file_sha256(onnx_path),
        intended_use=("Reference model for the appliance's denoising path: exercises the engine, the card and the "
                      "ONNX/TensorRT runtimes end to end on simulated data. Not for clinical use: trained on "
                      "simulated phantoms only, never validated on patient data."),
        training_data=(f"{n_train} simulated axial slices (appliance.synth.phantom, phantom seeds "
                       f"0-{n_train // 4 - 1}, 4 z positions each over 0-380 mm), {protocol.pixels}x{protocol.pixels} "
                       f"over {protocol.fov_mm:.0f} mm; fan beam on the project's host projector (curved detector, "
                       f"sod {protocol.sod_mm:.0f} mm, sdd {protocol.sdd_mm:.0f} mm, {protocol.n_views} views); "
                       f"Poisson + {protocol.electronic_noise:.0f}-photon electronic noise at "
                       f"{protocol.full_dose_photons:.0e} photons/element/view (full dose, target) and a quarter of "
                       f"it (input), independent realisations; FBP with the Hann window."),
        clinical_use=False,
        normalization=NORMALIZATION,
        scores=scores["card"],
    )
    card_path = out / f"{NAME}.toml"
    card_path.write_text(tomli_w.dumps(card.model_dump(mode="json")), encoding="utf-8")
    load_card(card_path)  # what the engine will do: schema and sha256
    return card_path


def train(args: argparse.Namespace) -> None:
    import torch

    from engines.train.model import ResidualDenoiser

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    protocol = ScanProtocol()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    train_pairs = load_pairs(training_sites(), protocol)
    held_pairs = load_pairs(heldout_sites(), protocol)
    t_data = time.perf_counter() - t0
    _log("pairs", training_slices=len(train_pairs), heldout_slices=len(held_pairs), seconds=round(t_data, 1))

    sampler = PatchSampler(train_pairs, protocol, args.patch, rng)
    model = ResidualDenoiser(1, args.features, args.depth)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = args.epochs * args.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * s / total)))
    rmse_low = body_rmse_hu(held_pairs, [p.low_dose_hu for p in held_pairs])
    _log("model", parameters=model.parameter_count(), features=args.features, depth=args.depth,
         steps=total, heldout_rmse_low_dose_hu=round(rmse_low, 2))

    history = []
    t1 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses = []
        for _ in range(args.steps_per_epoch):
            x, y = sampler.batch(args.batch)
            loss, mse = noise_loss(model(torch.from_numpy(x)), torch.from_numpy(y), args.mean_weight,
                                   args.mean_pool)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(mse.item())
        model.eval()
        rmse = body_rmse_hu(held_pairs, denoise_torch(model, held_pairs))
        row = {"epoch": epoch, "train_rmse_hu": round(math.sqrt(np.mean(losses)) * NORMALIZATION.scale_hu, 2),
               "heldout_rmse_hu": round(rmse, 2), "lr": round(sched.get_last_lr()[0], 6),
               "seconds": round(time.perf_counter() - t1, 1)}
        history.append(row)
        _log("epoch", **row)
    t_train = time.perf_counter() - t1

    onnx_path = out / f"{NAME}.onnx"
    export_onnx(model, onnx_path)
    torch_hu = denoise_torch(model, held_pairs)
    onnx_hu = denoise_onnx(onnx_path, held_pairs, args.threads)
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(torch_hu, onnx_hu))
    scores = score_denoiser(held_pairs, onnx_hu, protocol)
    report = {
        "model": f"{NAME}.onnx",
        "how_measured": (
            "ONNX Runtime (CPU) on held-out simulated quarter-dose slices (phantom seeds and z positions not used in "
            "training; engines.train.data.heldout_sites), each compared with the full-dose FBP of the same slice "
            "(the training target; independent noise). Regions: appliance.synth.phantom.uniform_regions (3 mm "
            "margin). noise_std_reduction = 1 - std(denoised)/std(quarter dose) in the region, variances pooled "
            "over slices by pixel count; mean_shift_hu = mean(denoised - full dose) over all the region's pixels; "
            "PSNR over the body (all tissue but outside air and table) against the full-dose FBP, peak 1000 HU; "
            "gain = PSNR(denoised) - PSNR(quarter dose). Card scores: the worst of liver/muscle/fat for noise "
            "reduction and |mean shift|, the mean PSNR gain over the held-out slices."),
        "heldout_sites": [{"phantom_seed": s.phantom_seed, "z_mm": s.z_mm} for s in heldout_sites()],
        **scores,
        "onnx_vs_torch_max_abs_diff_hu": round(max_diff, 5),
        "training": {
            "training_slices": len(train_pairs), "patch": args.patch, "batch": args.batch, "steps": total,
            "lr": args.lr, "mean_weight": args.mean_weight, "mean_pool": args.mean_pool, "seed": args.seed,
            "parameters": model.parameter_count(), "features": args.features,
            "depth": args.depth, "threads": args.threads, "pair_simulation_s": round(t_data, 1),
            "training_s": round(t_train, 1), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "epochs": history},
    }
    (out / f"{NAME}.scores.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    card_path = write_card(out, onnx_path, scores, protocol, len(train_pairs))
    _log("done", onnx=str(onnx_path), onnx_bytes=onnx_path.stat().st_size, card=str(card_path),
         onnx_vs_torch_max_abs_diff_hu=round(max_diff, 5), **scores["card"],
         total_s=round(time.perf_counter() - t0, 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="engines/models", help="folder for the ONNX file, its card and scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=64, help="patch side, pixels")
    p.add_argument("--features", type=int, default=32, help="channels of the hidden convolutions")
    p.add_argument("--depth", type=int, default=8, help="number of 3x3 convolutions")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mean-weight", type=float, default=8.0, help="weight of the block-mean error in the loss")
    p.add_argument("--mean-pool", type=int, default=16, help="block side for the block-mean error, pixels")
    p.add_argument("--threads", type=int, default=2)
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
