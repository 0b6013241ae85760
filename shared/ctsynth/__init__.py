"""ctsynth: synthesise CT where a full scan is missing (MONAI-based).

Modules: :mod:`ctsynth.geometry` (acquisition geometry), :mod:`ctsynth.drr` (differentiable DRR projector),
:mod:`ctsynth.losses`, :mod:`ctsynth.metrics`, :mod:`ctsynth.io` (NIfTI, DICOM, zip),
:mod:`ctsynth.transforms`, :mod:`ctsynth.phantoms`, :mod:`ctsynth.plots`, :mod:`ctsynth.bench`,
:mod:`ctsynth.engine` (training plumbing), :mod:`ctsynth.bundles` (find and run the bundles),
:mod:`ctsynth.prepare` (datasets), :mod:`ctsynth.maisi` (MAISI autoencoder), :mod:`ctsynth.slices` (slice
interpolation), :mod:`ctsynth.adversarial` (PatchGAN terms), :mod:`ctsynth.vq` (codebook), :mod:`ctsynth.cli`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
