"""What a benchmark run measures: sizes, sample counts, warm-ups. Two plans: the full one (the
committed results; about 45 minutes on 2 cores) and ``--quick`` (CI; under 2 minutes)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Plan:
    quick: bool
    warmup: int = 1
    # e2e: the daemon on loopback. Scaling over slices per series at concurrency 1 with the
    # project's SCU; both senders at the reference size; concurrency at its own size.
    e2e_in_plane: tuple[int, int] = (512, 512)  # rows, columns
    e2e_slices: dict[int, int] = field(default_factory=lambda: {64: 5, 128: 4, 300: 4, 600: 2})  # slices -> samples
    e2e_reference_slices: int = 300
    e2e_concurrency: dict[int, int] = field(default_factory=lambda: {2: 3, 4: 2})  # studies at once -> batches
    e2e_concurrency_slices: int = 64
    idle_seconds: float | None = None  # None: the configuration's completion.idle_seconds
    # ingest: the same study into the appliance and into dcmtk storescp, sent by dcmtk storescu
    ingest_shape: tuple[int, int, int] = (300, 512, 512)
    ingest_samples: int = 5
    # denoise: the stage alone on in-memory volumes
    denoise_in_plane: tuple[int, int] = (512, 512)
    denoise_slices: dict[int, int] = field(default_factory=lambda: {16: 5, 64: 3, 128: 3, 300: 2})
    # recon and kernels: cone beam, curved detector
    recon_n: int = 128
    recon_views: int = 180
    recon_detector: tuple[int, int] = (64, 256)  # rows, columns
    recon_samples: int = 3
    pwls_iterations: int = 3
    kernel_samples: int = 5

    def with_repeats(self, repeats: int) -> Plan:
        """Every configuration measured ``repeats`` times (concurrency: ``repeats`` batches)."""
        return replace(
            self,
            e2e_slices={k: repeats for k in self.e2e_slices},
            e2e_concurrency={k: repeats for k in self.e2e_concurrency},
            ingest_samples=repeats,
            denoise_slices={k: repeats for k in self.denoise_slices},
            recon_samples=repeats,
            kernel_samples=repeats,
        )


FULL = Plan(quick=False)

QUICK = Plan(
    quick=True,
    e2e_in_plane=(128, 128),
    e2e_slices={16: 2, 32: 2},
    e2e_reference_slices=32,
    e2e_concurrency={2: 1},
    e2e_concurrency_slices=16,
    idle_seconds=1.0,
    ingest_shape=(32, 256, 256),
    ingest_samples=2,
    denoise_in_plane=(128, 128),
    denoise_slices={8: 2, 16: 2},
    recon_n=40,
    recon_views=60,
    recon_detector=(24, 80),
    recon_samples=2,
    pwls_iterations=2,
    kernel_samples=2,
)
