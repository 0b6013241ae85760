"""A MONAI Label app serving the ctsynth bundles' inference (``main.py`` in this folder).

Start it on a machine where ``monailabel`` imports (see the README's MONAI Label section)::

    monailabel start_server --app "$(python -c 'import ctsynth.label_app, os; print(os.path.dirname(ctsynth.label_app.__file__))')" \\
        --studies /data/studies --conf bundles_dir /path/to/ctsynth/bundles --conf models all

Each bundle becomes a ``BundleInferTask`` with the settings of :data:`LABEL_BUNDLES` (the weights file it
loads, where its state dict sits in our checkpoints, no resampling of the prediction back onto the input grid:
the outputs are new volumes, not labels of the input). This module holds only that table, so that the contract
can be checked where ``monailabel`` cannot be imported.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LabelBundle", "LABEL_BUNDLES", "task_kwargs"]


@dataclass(frozen=True)
class LabelBundle:
    """How MONAI Label serves one bundle.

    Attributes:
        model_file: weights in ``models/`` that ``BundleInferTask`` loads into ``network_def``.
        description: shown in the MONAI Label client.
    """

    model_file: str
    description: str


#: the bundles MONAI Label can serve (one image in, one volume out). cascade_xray2ct is not among them: it needs
#: two or more radiographs and their geometry.json per request, and BundleInferTask hands the network one image.
LABEL_BUNDLES: dict[str, LabelBundle] = {
    "slice_interp_ldm": LabelBundle("model.pt", "thick-slice CT -> thin-slice CT (MAISI latent diffusion)"),
    "xray2ctpa_vqgan": LabelBundle("ldm.pt", "chest X-ray -> CT pulmonary angiography (VQ-GAN latent diffusion)"),
}


def task_kwargs() -> dict:
    """Keyword arguments every ctsynth ``BundleInferTask`` gets (besides ``const``): our checkpoints keep the
    state dict under ``"network"``; the prediction is not restored onto the input's grid; the type is ``others``."""
    return {"model_state_dict": "network", "add_post_restore": False, "load_strict": True, "type": "others"}
