"""Training plumbing shared by the bundles (ignite / MONAI engines).

* :func:`atomic_torch_save`: write-to-temporary then rename, so a crash never leaves half a checkpoint.
* :class:`CheckpointManager`: ``checkpoint_last.pt`` (full state, for resuming) every epoch, ``model.pt``
  (network weights) when the key validation metric improves, automatic resume, rank-0-only writes.
* :class:`TrainingHistory`: per-epoch losses, validation metrics and learning rate as JSON and a PNG plot.
* :func:`optimisation_step`: backward, clipping and the optimiser step with AMP, refusing non-finite losses.
* :class:`VolumeMetric`: PSNR / SSIM / MAE in HU as an ignite metric (distributed-safe).
* :func:`init_distributed`, :func:`wrap_distributed`, :func:`amp_settings`, :func:`trainable_parameters`,
  :func:`load_network_weights`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import nn

from ctsynth.atomic import atomic_write, atomic_write_json
from ctsynth.metrics import compute_image_metrics
from ctsynth.transforms import unscale_hu

__all__ = [
    "atomic_torch_save", "is_rank_zero", "init_distributed", "wrap_distributed", "unwrap", "trainable_parameters",
    "amp_settings", "engine_amp", "engine_autocast", "NonFiniteLossError", "optimisation_step", "read_checkpoint_meta",
    "load_network_weights", "rng_state", "set_rng_state", "CheckpointManager",
    "TrainingHistory", "ProgressBar", "VolumeMetric", "loss_output", "TriplanarImageHandler",
]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    return atomic_write(lambda tmp: torch.save(obj, tmp), path, ".tmp")


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_distributed(backend: str | None = None) -> torch.device:
    """Joins the ``torchrun`` process group (nccl on GPU, gloo on CPU) and returns this rank's device."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("multi-GPU configs must be launched with torchrun (RANK is not set), e.g. "
                               "`torchrun --nproc_per_node=2 -m monai.bundle run training --config_file ...`")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def wrap_distributed(module: nn.Module, device: torch.device | str) -> nn.Module:
    """DistributedDataParallel around ``module`` (``device_ids`` only on GPU)."""
    device = torch.device(device)
    module = module.to(device)
    if not dist.is_initialized():
        raise RuntimeError("wrap_distributed needs init_distributed() first")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel."""
    return module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else module


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what the optimiser of a partly frozen network gets)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the network has no trainable parameters (is every stage frozen?)")
    return params


_AMP_NOTICE: list[bool] = []


def amp_settings(device: torch.device | str, enabled: bool,
                 cpu_bf16: bool = False) -> tuple[bool, torch.dtype, torch.amp.GradScaler | None]:
    """(enabled, dtype, scaler) for mixed precision.

    On GPU: bfloat16 where supported (no scaler needed), otherwise float16 with a gradient scaler. On CPU AMP
    is bfloat16 where the caller says its network is safe for it (``cpu_bf16``: no ``grid_sample``, norms and
    distances kept in float32, as the VQ-GAN), otherwise off: bf16 ``grid_sample`` (used by the projector and
    back-projection) crashes in torch 2.13.
    """
    device = torch.device(device)
    if enabled and device.type == "cpu" and cpu_bf16:
        return True, torch.bfloat16, None
    if not enabled or device.type != "cuda":
        if enabled and not _AMP_NOTICE:
            _AMP_NOTICE.append(True)
            logger.info("AMP requested on %s: running in float32 (CPU bf16 grid_sample is unsupported)", device)
        return False, torch.float32, None
    if torch.cuda.is_bf16_supported():
        return True, torch.bfloat16, None
    return True, torch.float16, torch.amp.GradScaler("cuda")


def engine_amp(engine: Engine, enabled: bool,
               cpu_bf16: bool = False) -> tuple[bool, torch.dtype, torch.amp.GradScaler | None]:
    """:func:`amp_settings` for ``engine``'s device, decided once per engine (the scaler keeps state across
    steps)."""
    if getattr(engine, "ctsynth_amp", None) is None:
        engine.ctsynth_amp = amp_settings(engine.state.device, enabled, cpu_bf16)
        scaler, resumed = engine.ctsynth_amp[2], getattr(engine, "ctsynth_resumed_scaler", None)
        if scaler is not None and resumed:  # a resumed run keeps its loss scale
            scaler.load_state_dict(resumed)
    return engine.ctsynth_amp


def engine_autocast(engine: Engine, enabled: bool, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """The autocast context of :func:`engine_amp` (a no-op when AMP is off)."""
    on, dtype, _ = engine_amp(engine, enabled, cpu_bf16)
    return torch.autocast(device_type=torch.device(engine.state.device).type, dtype=dtype) if on \
        else contextlib.nullcontext()


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss stays NaN/Inf; the message says where and what to change."""


def optimisation_step(engine: Engine, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      parameters: Sequence[nn.Parameter] | None = None, grad_clip: float | None = 1.0,
                      scaler: torch.amp.GradScaler | None = None, max_nonfinite: int = 3,
                      terms: Mapping[str, float] | None = None, accumulate: int = 1) -> float | None:
    """Backward pass, gradient clipping (global norm) and optimiser step, with gradient accumulation.

    With ``accumulate`` = k, gradients of k consecutive calls are summed (each loss divided by k) and the
    optimiser steps on every k-th call. A non-finite loss skips its contribution (weights unchanged);
    ``max_nonfinite`` consecutive ones raise :class:`NonFiniteLossError`. Returns the gradient norm before
    clipping on the calls that step, None otherwise.
    """
    accumulate = max(int(accumulate), 1)
    state = engine.state
    key = f"accumulated_{id(optimizer)}"  # per optimiser (GAN training steps two)
    done = getattr(state, key, 0)
    if done == 0:
        optimizer.zero_grad(set_to_none=True)
    count = getattr(state, "nonfinite_losses", 0)
    if not torch.isfinite(loss.detach()):
        count += 1
        state.nonfinite_losses = count
        where = f"epoch {state.epoch}, iteration {state.iteration}"
        detail = ", ".join(f"{k}={v:.4g}" for k, v in (terms or {}).items())
        logger.warning("non-finite loss at %s (%s); step skipped (%d in a row)", where, detail or "no terms", count)
        if count >= max_nonfinite:
            raise NonFiniteLossError(
                f"loss was NaN/Inf for {count} consecutive steps (last at {where}; terms: {detail or 'n/a'}). "
                "The weights were not updated by those steps and the last checkpoint is intact. Fix: lower the "
                "learning rate (--learning_rate), turn AMP off (--amp false), check the inputs for NaN "
                "(ctsynth prepare reports them), then resume with the same command."
            )
        return None
    state.nonfinite_losses = 0
    params = list(parameters) if parameters is not None else [p for g in optimizer.param_groups for p in g["params"]]
    scaled = loss / accumulate if accumulate > 1 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    done += 1
    if done < accumulate:
        setattr(state, key, done)
        return None
    setattr(state, key, 0)
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(norm)


def _read_checkpoint(path: str | Path, missing_hint: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file (``missing_hint`` says what to do)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}{missing_hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` entry of a :class:`CheckpointManager` weights file (empty for a bare state dict)."""
    obj = _read_checkpoint(path, "; train the bundle first or pass --checkpoint")
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its meta is a {type(meta).__name__}, not a dict; use a checkpoint written by "
                         "ctsynth's training")
    return dict(meta)


def load_network_weights(network: nn.Module, path: str | Path, strict: bool = True,
                         map_location: str | torch.device = "cpu", require_meta: Sequence[str] = (),
                         not_this_kind: str = "not a checkpoint of this model") -> dict[str, Any]:
    """Loads weights written by :class:`CheckpointManager` (``model.pt`` / ``checkpoint_last.pt``) or a bare
    state dict into ``network`` (one read of the file). Returns the checkpoint's ``meta`` (empty for bare state
    dicts), which must hold every key of ``require_meta`` (else ``not_this_kind`` is the error, with the fix).

    Raises:
        FileNotFoundError / ValueError: naming the file and what to do.
    """
    obj = _read_checkpoint(path, ". Train the previous stage first or pass the right path (e.g. --init_checkpoint "
                                 "/ --checkpoint)", map_location)
    meta = dict(obj.get("meta", {})) if isinstance(obj, dict) and "network" in obj else {}
    missing = [k for k in require_meta if k not in meta]
    if missing:
        raise ValueError(f"{path}: {not_this_kind} (its meta lacks {missing})")
    state = obj.get("network", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a ctsynth checkpoint with a 'network' entry")
    try:
        unwrap(network).load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit this network ({str(e).splitlines()[0]}...). Use the same "
                         "network settings as the run that wrote them.") from None
    return meta


def rng_state() -> dict[str, Any]:
    """The random generators' states (Python, NumPy, torch CPU and CUDA) as tensors and plain types, so a
    checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_state` returned (the CUDA part only where CUDA is present)."""
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Atomic checkpoints with automatic resume (an ignite/MONAI handler: ``attach(trainer)``).

    Files in ``save_dir``: ``checkpoint_last.pt`` (every ``save_interval`` epochs and at the end: every object
    of ``save_dict`` (network, optimizers, LR schedulers, ...) plus the trainer's epoch/iteration, the random
    generators' states and the float16 AMP gradient scaler) and ``model.pt`` (the network, when the key metric of
    ``evaluator`` improves; every epoch when there is no evaluator). ``publish_path`` gets a copy of
    ``model.pt`` when training completes. Only rank 0 writes.

    Args:
        save_dir: folder for the files.
        save_dict: name -> object with ``state_dict``/``load_state_dict``; must hold ``network``.
        evaluator: validation engine whose ``key_metric`` picks the best model.
        key_metric: metric name in ``evaluator.state.metrics``.
        greater_is_better: direction of the metric.
        resume: continue from ``checkpoint_last.pt`` when it exists.
        save_interval: epochs between ``checkpoint_last.pt`` writes.
        meta: extra JSON-able facts stored with the weights (stage, sizes, ...).
        publish_path: where the final best weights are copied (e.g. ``models/model.pt``).
    """

    LAST, BEST = "checkpoint_last.pt", "model.pt"

    def __init__(self, save_dir: str | Path, save_dict: Mapping[str, Any], evaluator: Engine | None = None,
                 key_metric: str | None = None, greater_is_better: bool = True, resume: bool = True,
                 save_interval: int = 1, meta: Mapping[str, Any] | None = None,
                 publish_path: str | Path | None = None) -> None:
        if "network" not in save_dict:
            raise ValueError("save_dict needs a 'network' entry")
        if evaluator is not None and not key_metric:
            raise ValueError("key_metric is needed with an evaluator")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.evaluator, self.key_metric, self.greater = evaluator, key_metric, greater_is_better
        self.resume, self.save_interval = resume, max(1, int(save_interval))
        self.meta = dict(meta or {})
        self.publish_path = Path(publish_path) if publish_path else None
        self.best_metric: float | None = None
        self.best_epoch = 0

    @property
    def last_path(self) -> Path:
        return self.save_dir / self.LAST

    @property
    def best_path(self) -> Path:
        return self.save_dir / self.BEST

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_last)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._on_validation, engine)
        else:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save_best, engine, None)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.publish)

    def _state(self, engine: Engine) -> dict[str, Any]:
        state = {k: (unwrap(v) if isinstance(v, nn.Module) else v).state_dict() for k, v in self.save_dict.items()}
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        state["manager"] = {"best_metric": self.best_metric, "best_epoch": self.best_epoch}
        state["rng"] = rng_state()
        scaler = (getattr(engine, "ctsynth_amp", None) or (None, None, None))[2]
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        return state

    def save_last(self, engine: Engine) -> None:
        if is_rank_zero():
            atomic_torch_save(self._state(engine), self.last_path)

    def _on_validation(self, evaluator: Engine, trainer: Engine) -> None:
        value = evaluator.state.metrics.get(self.key_metric)
        if value is None:
            raise KeyError(f"key metric {self.key_metric!r} not among the validation metrics "
                           f"{sorted(evaluator.state.metrics)}")
        self._save_best(trainer, float(value))

    def _save_best(self, trainer: Engine, value: float | None) -> None:
        if value is not None and not math.isfinite(value):
            if self.best_path.is_file() and self.best_metric is not None:
                logger.warning("validation %s is %s at epoch %d; best model kept", self.key_metric, value,
                               trainer.state.epoch)
                return
            logger.warning("validation %s is %s at epoch %d and no model was saved yet: saving this one (e.g. an AUC on "
                           "a validation split holding one class)", self.key_metric, value, trainer.state.epoch)
            value = None
        better = (value is None or self.best_metric is None
                  or (value > self.best_metric if self.greater else value < self.best_metric))
        if not better:
            return
        self.best_metric, self.best_epoch = value, trainer.state.epoch
        if is_rank_zero():
            net = unwrap(self.save_dict["network"])
            meta = {**self.meta, "epoch": trainer.state.epoch, "key_metric": self.key_metric, "metric": value,
                    "network_target": f"{type(net).__module__}.{type(net).__qualname__}",
                    "network_config": getattr(net, "config", None)}
            atomic_torch_save({"network": unwrap(self.save_dict["network"]).state_dict(), "meta": meta}, self.best_path)
            logger.info("best model (epoch %d, %s=%s) -> %s", trainer.state.epoch, self.key_metric, value, self.best_path)

    def load_last(self, engine: Engine) -> None:
        """Restores every object and the trainer's epoch/iteration from ``checkpoint_last.pt`` if present."""
        if not self.last_path.is_file():
            return
        try:
            ckpt = torch.load(self.last_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot resume from {self.last_path} ({type(e).__name__}: {e}); move it away to "
                             "start over, or restore it from a backup") from None
        missing = [k for k in self.save_dict if k not in ckpt]
        if missing:
            raise ValueError(f"{self.last_path} lacks {missing}; it was written by another configuration. Move it "
                             "away to start over.")
        for k, obj in self.save_dict.items():
            try:
                (unwrap(obj) if isinstance(obj, nn.Module) else obj).load_state_dict(ckpt[k])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(f"cannot resume {k!r} from {self.last_path}: it was written with other settings "
                                 f"({str(e).splitlines()[0][:300]}). Use the same settings as that run, or move the "
                                 "file away (or pass --resume false) to start over.") from None
        engine.state.epoch = int(ckpt["trainer"]["epoch"])
        engine.state.iteration = int(ckpt["trainer"]["iteration"])
        self.best_metric = ckpt["manager"]["best_metric"]
        self.best_epoch = int(ckpt["manager"]["best_epoch"])
        if "rng" in ckpt:  # the run continues with the random stream it would have had
            set_rng_state(ckpt["rng"])
        if "grad_scaler" in ckpt:  # float16 AMP: engine_amp hands it to the scaler it creates
            engine.ctsynth_resumed_scaler = ckpt["grad_scaler"]
        logger.info("resumed from %s at epoch %d (best %s=%s at epoch %d)", self.last_path, engine.state.epoch,
                    self.key_metric, self.best_metric, self.best_epoch)
        if engine.state.epoch >= engine.state.max_epochs:
            logger.info("training already reached max_epochs=%d; nothing to do", engine.state.max_epochs)
            engine.terminate()

    def publish(self, engine: Engine) -> None:
        if not self.best_path.is_file():  # never validated (val_interval > epochs): the final weights
            logger.warning("no validation ran before the end of training: %s holds the last weights", self.best_path)
            self._save_best(engine, None)
        if self.publish_path is None or not is_rank_zero() or not self.best_path.is_file():
            return
        atomic_torch_save(torch.load(self.best_path, map_location="cpu", weights_only=True), self.publish_path)
        logger.info("published %s -> %s", self.best_path, self.publish_path)


class TriplanarImageHandler:
    """Writes the validation's last target, prediction and absolute error as one tri-planar image to TensorBoard
    (tag ``tag``, step = the training epoch) after every validation run (rank 0).

    Attach to the evaluator (a ``val_handlers`` entry). ``output_transform`` maps ``engine.state.output`` to
    (prediction, target) batches (B, 1, X, Y, Z) on the network's intensity scale; ``window`` is that scale's
    display range (default [0, 1]).
    """

    def __init__(self, log_dir: str | Path, tag: str = "val_triplanar", window: Sequence[float] = (0.0, 1.0),
                 output_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.log_dir, self.tag, self.window = str(log_dir), tag, (float(window[0]), float(window[1]))
        self.output_transform = output_transform or _pred_label
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        if not is_rank_zero() or engine.state.output is None:
            return
        pred, target = self.output_transform(engine.state.output)
        if pred is None or target is None or pred.ndim != 5 or target.ndim != 5:
            return  # not volumes (e.g. a classifier's logits): nothing to show
        from ctsynth.plots import triplanar_grid

        p, t = pred[0, :1].detach().float(), target[0, :1].detach().float()
        img = triplanar_grid([t, p, (p - t).abs()], *self.window)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, img, global_step=int(engine.state.epoch))
        self._writer.flush()  # readable at once (validation runs are minutes apart)


def _pred_label(output: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pred, label) of an evaluator's output: a dict, or the first item of a decollated list."""
    if isinstance(output, list) and output:
        items = [o for o in output if isinstance(o, Mapping)]
        if not items:
            return None, None
        pred, label = items[0].get("pred"), items[0].get("label")
        return (pred[None] if pred is not None else None), (label[None] if label is not None else None)
    if isinstance(output, Mapping):
        return output.get("pred"), output.get("label")
    return None, None


class TrainingHistory:
    """Per-epoch mean training loss (and its terms), validation metrics and learning rate.

    Writes ``history.json`` and ``curves.png`` in ``out_dir`` after every epoch (rank 0). On resume, epochs
    after the resumed one are dropped from the history.

    Args:
        out_dir: destination folder.
        optimizer: read for the learning rate.
        evaluator: validation engine whose metrics are recorded.
    """

    def __init__(self, out_dir: str | Path, optimizer: torch.optim.Optimizer | None = None,
                 evaluator: Engine | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.optimizer, self.evaluator = optimizer, evaluator
        self.rows: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._n = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _started(self, engine: Engine) -> None:
        path = self.out_dir / "history.json"
        if path.is_file():
            old = json.loads(path.read_text()).get("epochs", [])
            self.rows = [r for r in old if r.get("epoch", 0) <= engine.state.epoch]

    def _reset(self, engine: Engine) -> None:
        self._sums, self._n = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        out = engine.state.output or {}
        values = {"loss": out.get("loss")} | {f"loss_{k}": v for k, v in (out.get("terms") or {}).items()}
        for k, v in values.items():
            if v is not None:
                v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                if math.isfinite(v):
                    self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def _write(self, engine: Engine) -> None:
        row: dict[str, float] = {"epoch": engine.state.epoch}
        row.update({k: v / max(self._n, 1) for k, v in self._sums.items()})
        if self.optimizer is not None:
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        row.update({k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))})  # trainer's
        if self.evaluator is not None and self.evaluator.state.epoch_length:
            row.update({k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))})
        self.rows.append(row)
        if not is_rank_zero():
            return
        from ctsynth.plots import save_curves_png

        atomic_write_json({"epochs": self.rows}, self.out_dir / "history.json")
        epochs = [r["epoch"] for r in self.rows]
        losses = {k: [r.get(k, float("nan")) for r in self.rows] for k in self.rows[-1] if k.startswith("loss")}
        save_curves_png(losses, self.out_dir / "curves.png", xlabel="epoch", ylabel="training loss", x=epochs, logy=True)


class ProgressBar:
    """tqdm progress bar over an epoch showing the loss (ignite's, attachable as a MONAI handler)."""

    def __init__(self, persist: bool = False) -> None:
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if not is_rank_zero():
            return
        from ignite.handlers import ProgressBar as _Bar

        _Bar(persist=self.persist).attach(engine, output_transform=loss_output)


def loss_output(output: Any) -> dict[str, float]:
    """``{"loss": value}`` from an engine output (the ``output_transform`` of stats / TensorBoard handlers)."""
    if isinstance(output, Mapping) and output.get("loss") is not None:
        return {"loss": float(torch.as_tensor(output["loss"]).detach())}
    return {}


class VolumeMetric(Metric):
    """Mean per-volume PSNR, SSIM or MAE in HU of normalised predictions (ignite metric).

    Args:
        metric: ``"psnr"``, ``"ssim"`` or ``"mae"``.
        window: HU window the metric is computed on (data range = its width).
        intensity_range: HU mapped to [0, 1] by the data pipeline; ``None``: predictions and labels are in HU.
        output_transform: engine output -> (pred, label), each (B, 1, S0, S1, S2) normalised.
    """

    METRICS = ("psnr", "ssim", "mae")

    def __init__(self, metric: str = "psnr", window: Sequence[float] = (-1000.0, 1000.0),
                 intensity_range: Sequence[float] | None = (-1000.0, 1000.0),
                 output_transform: Callable = lambda o: (o["pred"], o["label"]), device: str | torch.device = "cpu"):
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {self.METRICS}, got {metric!r}")
        self.metric, self.window = metric, tuple(window)
        self.intensity_range = tuple(intensity_range) if intensity_range is not None else None
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._n = torch.tensor(0, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        pred, label = output
        pred = torch.as_tensor(pred).detach().float()
        label = torch.as_tensor(label).detach().float()
        if pred.ndim == 4:
            pred, label = pred[None], label[None]
        for p, t in zip(pred, label):
            p, t = p.cpu(), t.cpu()
            if self.intensity_range is not None:
                p, t = unscale_hu(p, self.intensity_range), unscale_hu(t, self.intensity_range)
            m = compute_image_metrics(p, t, window=self.window)
            self._sum += m[self.metric]
            self._n += 1

    @sync_all_reduce("_sum", "_n")
    def compute(self) -> float:
        if int(self._n) == 0:
            raise RuntimeError("VolumeMetric got no volumes (empty validation set?)")
        return float(self._sum / self._n)
