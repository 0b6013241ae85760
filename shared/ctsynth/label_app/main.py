"""MONAI Label app: serves the ctsynth bundles of :data:`ctsynth.label_app.LABEL_BUNDLES` as infer tasks.

Configuration (``--conf KEY VALUE``): ``bundles_dir`` (folder holding the bundles, default ``$CTSYNTH_BUNDLES_DIR``
or the checkout's ``bundles/``), ``models`` (``all`` or a comma-separated list of bundle names).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

import ctsynth
from ctsynth.label_app import LABEL_BUNDLES, task_kwargs

logger = logging.getLogger(__name__)


class CtsynthConstants(BundleConstants):
    """BundleConstants with the weights file of one ctsynth bundle."""

    def __init__(self, model_file: str) -> None:
        self._model_file = model_file

    def model_pytorch(self) -> str:
        return self._model_file


class CtsynthLabelApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        default_dir = os.environ.get("CTSYNTH_BUNDLES_DIR") or str(Path(ctsynth.__file__).resolve().parents[2] / "bundles")
        self.bundles_dir = Path(conf.get("bundles_dir", default_dir))
        wanted = conf.get("models", "all")
        names = list(LABEL_BUNDLES) if wanted == "all" else [n.strip() for n in wanted.split(",") if n.strip()]
        unknown = [n for n in names if n not in LABEL_BUNDLES]
        if unknown:
            raise ValueError(f"--conf models: unknown {unknown}; choose 'all' or from {list(LABEL_BUNDLES)}")
        self.names = names
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="ctsynth",
                         description="ctsynth: synthesise CT where a full scan is missing", version=ctsynth.__version__)

    def init_infers(self) -> dict:
        infers = {}
        for name in self.names:
            path = self.bundles_dir / name
            task = BundleInferTask(str(path), self.conf, const=CtsynthConstants(LABEL_BUNDLES[name].model_file),
                                   **task_kwargs())
            if not task.is_valid():
                logger.warning("skipping %s: no configs/inference.json or no models/%s under %s", name,
                               LABEL_BUNDLES[name].model_file, path)
                continue
            infers[name] = task
        return infers
