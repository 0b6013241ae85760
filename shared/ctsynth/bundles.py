"""Finding and running the bundles from the package (demo, ``ctsynth reconstruct``, tests, MONAI Label).

A bundle config sets ``"bundle_root": "$ctsynth.bundles.bundle_root('<name>')"``; that finds the bundle
folder and puts it first on ``sys.path`` (forgetting another bundle's ``scripts``), so ``scripts.*`` targets
import however the config is parsed, also in a process serving several bundles.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

from ctsynth.engine import read_checkpoint_meta
from ctsynth.meta_schema import CheckpointNetwork, MetaError, check_plain_value, validate_checkpoint_meta

__all__ = ["BUNDLES", "bundle_root", "bundle_models", "bundle_module", "bundle_version", "pack_bundle", "run_bundle", "parse_device",
           "checkpoint_rules", "checkpoint_network", "checkpoint_settings", "checkpoint_config", "NetworkExport",
           "EXPORTS", "NOT_EXPORTED", "verify_bundle"]

logger = logging.getLogger(__name__)

#: The bundles of this project.
BUNDLES = ("cascade_xray2ct", "slice_interp_ldm", "xray2ctpa_vqgan")


def bundle_root(name: str, add_to_path: bool = True) -> str:
    """Folder of bundle ``name``.

    Looked up in order: ``$CTSYNTH_BUNDLES_DIR/<name>``; the bundle whose ``configs/`` hold the
    ``--config_file`` given to ``python -m monai.bundle run`` (so a bundle fetched with ``monai.bundle download``
    runs its own scripts and writes into its own ``models/``, wherever it lies); the current folder when it is
    that bundle; ``./bundles/<name>``; and the ``bundles/`` folder of the checkout this package was installed from.

    Raises:
        FileNotFoundError: listing where it looked.
    """
    if name not in BUNDLES:
        raise ValueError(f"unknown bundle {name!r}; choose from {BUNDLES}")
    cwd = Path.cwd()
    candidates = []
    if os.environ.get("CTSYNTH_BUNDLES_DIR"):
        candidates.append(Path(os.environ["CTSYNTH_BUNDLES_DIR"]) / name)
    candidates += [d for d in _config_file_bundles(sys.argv) if d.name == name]
    candidates += [cwd if cwd.name == name else None, cwd / "bundles" / name,
                   Path(__file__).resolve().parents[2] / "bundles" / name]
    for c in candidates:
        if c is not None and (c / "configs").is_dir():
            root = str(c.resolve())
            if add_to_path:
                _activate(root)
            return root
    raise FileNotFoundError(
        f"bundle {name!r} not found (looked in {[str(c) for c in candidates if c is not None]}); run from the "
        "ctsynth checkout, or set CTSYNTH_BUNDLES_DIR to the folder holding the bundles"
    )


def _config_file_bundles(argv: Sequence[str]) -> list[Path]:
    """Bundle folders (parents of ``configs/``) of the ``--config_file`` values in a ``monai.bundle`` command line:
    ``--config_file a.json``, ``--config_file=a.json`` or a list such as ``"['a.json','b.json']"``."""
    values = []
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config_file="):
            values.append(arg.split("=", 1)[1])
    out = []
    for v in values:
        for item in v.strip("[]()").split(","):
            f = Path(item.strip().strip("'\"")).expanduser()
            if f.parent.name == "configs" and f.parent.is_dir():
                out.append(f.parent.parent.resolve())
    return out


def _activate(root: str) -> None:
    """Puts bundle ``root`` first on ``sys.path`` and forgets another bundle's ``scripts`` package, so that
    ``import scripts...`` resolves to this bundle's (every bundle names its package ``scripts``)."""
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    for mod in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not str(getattr(sys.modules[mod], "__file__", "") or "").startswith(str(root)):
            del sys.modules[mod]


def bundle_models(name: str, models_dir: str | Path | None = None) -> Path:
    """``models_dir`` when given, else bundle ``name``'s ``models/`` folder (where its trainings publish weights)."""
    return Path(models_dir) if models_dir else Path(bundle_root(name)) / "models"


def bundle_module(name: str, module: str) -> Any:
    """Imports ``scripts.<module>`` of bundle ``name`` (e.g. ``bundle_module("slice_interp_ldm", "sampling")``)."""
    bundle_root(name)
    return importlib.import_module(f"scripts.{module}")


def bundle_version(name: str) -> str:
    """The ``version`` in bundle ``name``'s ``configs/metadata.json``."""
    meta = Path(bundle_root(name, add_to_path=False)) / "configs" / "metadata.json"
    return str(json.loads(meta.read_text())["version"])


#: folders of a bundle that a run fills and a package must not carry
_PACK_SKIP_DIRS = {"__pycache__", "data", "eval", "logs", "runs", ".ipynb_checkpoints"}
#: weight suffixes, packed only on request (model-zoo bundles fetch them through large_files.yml)
_WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".safetensors", ".onnx")


def pack_bundle(name: str, out_dir: str | Path, weights: bool = False, weights_url: str | None = None) -> Path:
    """Zips bundle ``name`` as the model zoo hosts bundles: ``OUT_DIR/<name>_v<version>.zip`` holding one
    top folder ``<name>/`` (configs, scripts, docs, LICENSE, large_files.yml, models/README.md).

    Run outputs (``data/``, ``eval/``, logs, caches, training state in ``models/<stage>/``) never go in; the
    weights directly in ``models/`` (``*.pt`` ...) only with ``weights=True`` (otherwise users fetch them with
    ``python -m monai.bundle download_large_files``).
    With ``weights_url`` the weights under ``models/`` are copied to ``OUT_DIR/<name>_v<version>_files/models/``
    for upload to that URL, and the packed ``large_files.yml`` lists each (URL, sha256) after the bundle's own
    entries. The zip is written next to its final name and renamed, so an interrupted pack leaves no partial file.

    Returns:
        The zip's path.
    """
    import zipfile

    root = Path(bundle_root(name, add_to_path=False))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}_v{bundle_version(name)}.zip"
    tmp = target.with_name(target.name + ".partial")
    files = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or _PACK_SKIP_DIRS & set(rel.parts[:-1]) or f.suffix == ".pyc":
            continue
        if f.suffix in _WEIGHT_SUFFIXES and not (weights and _is_published_weight(rel)):
            continue
        if rel.parts[0] == "models" and f.suffix not in _WEIGHT_SUFFIXES and f.name != "README.md":
            continue  # training state beside the weights (history, logs)
        files.append((f, Path(name) / rel))
    large_files = _published_large_files(root, out_dir / f"{target.stem}_files", weights_url) if weights_url else None
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f, arc in files:
                if large_files is not None and arc.as_posix() == f"{name}/large_files.yml":
                    continue
                zf.write(f, arc.as_posix())
            if large_files is not None:
                zf.writestr(f"{name}/large_files.yml", large_files)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {target}: {e.strerror or e}; free space or choose another --out") from None
    logger.info("packed %d files of %s -> %s", len(files), root, target)
    return target


def _is_published_weight(rel: Path) -> bool:
    """Weights a bundle publishes: files directly in ``models/`` (``models/<stage>/`` holds training state:
    ``checkpoint_last.pt`` with optimizer and RNG states, per-stage best weights)."""
    return len(rel.parts) == 2 and rel.parts[0] == "models" and rel.suffix in _WEIGHT_SUFFIXES


def _published_large_files(root: Path, files_dir: Path, base_url: str) -> str:
    """Copies the weights under ``root/models`` into ``files_dir/models`` and returns ``root/large_files.yml``
    with an entry per copied file (``base_url/models/<file>``, sha256) appended (entries for the same path replaced)."""
    import hashlib
    import shutil

    import yaml

    src = root / "large_files.yml"
    entries = list((yaml.safe_load(src.read_text()) or {}).get("large_files") or []) if src.is_file() else []
    published = []
    for f in sorted((root / "models").glob("*")):
        if not f.is_file() or not _is_published_weight(f.relative_to(root)):
            continue
        rel = f.relative_to(root).as_posix()
        dst = files_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        digest = hashlib.sha256()
        with open(dst, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        published.append({"path": rel, "url": f"{base_url.rstrip('/')}/{rel}", "hash_val": digest.hexdigest(),
                          "hash_type": "sha256"})
    if not published:
        raise FileNotFoundError(f"--weights-url given but {root / 'models'} holds no weights ({_WEIGHT_SUFFIXES}); "
                                "train the bundle first")
    paths = {p["path"] for p in published}
    entries = [e for e in entries if e.get("path") not in paths] + published
    logger.info("weights to upload to %s: %s", base_url, files_dir)
    return yaml.safe_dump({"large_files": entries}, sort_keys=False)


def run_bundle(name: str, configs: Sequence[str], run_id: str, overrides: Mapping[str, Any] | None = None,
               init_id: str = "initialize", final_id: str = "finalize", device: str | None = None) -> Any:
    """Runs ``run_id`` of bundle ``name`` with ``configs`` (file names in its ``configs/``, merged in order), as
    ``python -m monai.bundle run`` would, with ``overrides`` (config ids -> values) taken as **data**.

    A top-level id's value (``"output": "/tmp/$x"``) never reaches MONAI's config parser: it becomes that id's
    resolved value as it is, so no string is evaluated (``$``), followed (``@``, ``%``) or rewritten (``#``), and
    no dict is instantiated (``_target_``). A nested id (``"network_def#hidden": 64``) is set in the config and
    must hold plain data (numbers, booleans, words: :func:`ctsynth.meta_schema.check_plain_value`). ``device``
    (e.g. ``cuda:1``) replaces the config's ``device`` when given.

    Raises:
        ValueError: a nested override that is not plain data, or a device torch does not know.
    """
    literals, nested = _split_overrides(overrides or {})
    if device:
        literals["device"] = parse_device(device)
    root = Path(bundle_root(name))
    files = [str(root / "configs" / c) for c in configs]
    workflow = _DataOverrideWorkflow(literals, config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                                     logging_file=False, workflow_type=None, init_id=init_id, run_id=run_id,
                                     final_id=final_id, **nested)
    workflow.initialize()
    try:
        return workflow.run()
    except RuntimeError as e:  # MONAI wraps errors raised while building or evaluating config items
        root_error = e
        while root_error.__cause__ is not None:
            root_error = root_error.__cause__
        if root_error is not e and isinstance(root_error, (ValueError, KeyError, OSError)):
            raise root_error from None  # ours name the file and the fix; the wrapper adds nothing for the user
        raise
    finally:
        workflow.finalize()


def parse_device(device: str | Any) -> Any:
    """``torch.device(device)``, or a ValueError that says what a device looks like."""
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {str(device)[:60]!r} is not a device; use cpu, cuda or cuda:N") from None


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level ids -> values kept out of the parser, nested ids -> checked plain values for the parser)."""
    literals, nested = {}, {}
    for key, value in overrides.items():
        if "#" in key or "::" in key:
            try:
                nested[key] = check_plain_value(value, "override", key, None, None)
            except MetaError:
                raise ValueError(f"override {key!r} must be plain data (numbers, booleans, words; no '$', '@', '%', "
                                 f"'#' or '_target_'), got {str(value)[:80]!r}; set its top-level id instead, whose "
                                 "value is never parsed") from None
        else:
            literals[key] = value
    return literals, nested


class _DataOverrideWorkflow(ConfigWorkflow):
    """:class:`monai.bundle.ConfigWorkflow` whose ``initialize`` parses the configs, then sets the data overrides as
    resolved values (so references such as ``@output`` get them verbatim) before running ``init_id``."""

    def __init__(self, literals: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.literals = dict(literals)

    def initialize(self) -> Any:
        self.parser.parse(reset=True)
        self.parser.ref_resolver.resolved_content.update(self.literals)
        self._is_initialized = True
        return self._run_expr(id=self.init_id)


#: the file in a bundle's ``configs/`` describing what its checkpoints' meta may hold (see ``checkpoint_settings``)
CHECKPOINT_RULES = "checkpoints.json"


def checkpoint_rules(name: str, role: str) -> dict[str, Any]:
    """Bundle ``name``'s rules for its ``role`` checkpoint (``configs/checkpoints.json``): ``network_targets``
    (allowed classes), ``fields`` (:class:`ctsynth.meta_schema.MetaField` per meta key), ``network_config``
    (rules per constructor argument), ``network_int_max``, ``required`` keys with ``kind`` (what such a file
    is), and ``config_keys`` (meta keys that set config ids of the same name)."""
    path = Path(bundle_root(name, add_to_path=False)) / "configs" / CHECKPOINT_RULES
    rules = json.loads(path.read_text())
    if role not in rules:
        raise KeyError(f"{path} has no rules for {role!r} checkpoints; it lists {sorted(rules)}")
    return rules[role]


def checkpoint_network(name: str, checkpoint: str | Path, role: str = "model",
                       meta: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], CheckpointNetwork | None]:
    """The checked meta of bundle ``name``'s ``role`` checkpoint and the network it describes (``None`` for a bare
    state dict), validated against the bundle's :func:`checkpoint_rules`.

    Raises:
        MetaError: naming the file and the key that breaks the rules (an unknown network class, an argument the
            class does not take, a value out of range, a string a config parser would evaluate).
    """
    _, checked, network = _checked_checkpoint(name, checkpoint, role, meta)
    return checked, network


def checkpoint_settings(name: str, checkpoint: str | Path, role: str = "model",
                        meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Overrides (data, for :func:`run_bundle`) that rebuild the network a checkpoint of bundle ``name`` was trained
    with: ``checkpoint`` (its path), ``network_def`` (the network, built here from the checked class and
    arguments; left out for a bare state dict), ``sizes`` (from its ``sizes`` / ``size`` argument) and the
    rules' ``config_keys`` it records (e.g. the noise schedule). Pass ``meta`` when it was read already.

    Raises:
        MetaError: as :func:`checkpoint_network`.
    """
    rules, checked, network = _checked_checkpoint(name, checkpoint, role, meta)
    out = {"checkpoint": str(checkpoint), **_recorded_settings(rules, checked, network)}
    if network is not None:
        out["network_def"] = network.cls(**network.args)
    return out


def checkpoint_config(name: str, checkpoint: str | Path, role: str = "model") -> dict[str, Any]:
    """The same as :func:`checkpoint_settings` in config form, for MONAI's own tools that take config overrides
    (``verify_net_in_out``, ``ckpt_export``, MONAI Label's ``BundleInferTask``): ``network_def`` is the checked
    ``{"_target_": <the bundle's allowed class>, **arguments}``, every value plain data."""
    rules, checked, network = _checked_checkpoint(name, checkpoint, role, None)
    out = _recorded_settings(rules, checked, network)
    if network is not None:
        out["network_def"] = {"_target_": network.target, **network.args}
    return out


def _checked_checkpoint(name: str, checkpoint: str | Path, role: str, meta: Mapping[str, Any] | None
                        ) -> tuple[dict[str, Any], dict[str, Any], CheckpointNetwork | None]:
    """(the rules, the checked meta, the checked network) of a checkpoint (see :func:`checkpoint_network`)."""
    rules = checkpoint_rules(name, role)
    bundle_root(name)  # the bundle's scripts resolve the allowed targets
    targets = {}
    for target in rules.get("network_targets", ()):
        module, _, attr = target.rpartition(".")
        targets[target] = getattr(importlib.import_module(module), attr)
    raw = read_checkpoint_meta(checkpoint) if meta is None else meta
    return (rules, *validate_checkpoint_meta(raw, rules, checkpoint, targets))


def _recorded_settings(rules: Mapping[str, Any], checked: Mapping[str, Any],
                       network: CheckpointNetwork | None) -> dict[str, Any]:
    """The config ids a checkpoint sets besides its network: the rules' ``config_keys`` and ``sizes``."""
    out = {k: checked[k] for k in rules.get("config_keys", ()) if k in checked}
    args = network.args if network is not None else {}
    if "sizes" in args:
        out["sizes"] = list(args["sizes"])
    elif "size" in args:
        out["sizes"] = [args["size"]]
    return out


@dataclass(frozen=True)
class NetworkExport:
    """A network of a bundle that MONAI's ``verify_net_in_out`` and ``ckpt_export`` handle (one tensor in, one out).

    Attributes:
        configs: config files (in ``configs/``) defining ``net_id``, merged in order.
        net_id: the network's config id.
        label: its key in :func:`verify_bundle`'s report and per-network arguments (default ``net_id``; needed where
            two configs of a bundle use the same id for different networks).
        data_format: the ``metadata.json`` entry describing its input ``image`` and output ``pred``
            (``network_data_format`` describes the bundle's whole inference, which may chain several networks).
        checkpoint: its weights in ``models/`` (ctsynth checkpoints keep the state dict under ``"network"``).
        use_trace: TorchScript by tracing (``torch.jit.trace``) rather than scripting.
        overrides: config overrides that make the network exportable (same weights).
        export: write TorchScript (False: ``verify_net_in_out`` only, e.g. for several inputs).
        forward_args: further forward inputs for ``verify_net_in_out``: name -> (shape, dtype).
        settings: what the user must give (``verify_bundle(settings=...)``): name -> the config id it sets.
        adapt: fills the data format from those settings (e.g. the radiographs' size from the geometry).
    """

    configs: tuple[str, ...]
    net_id: str
    data_format: str
    checkpoint: str
    use_trace: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    export: bool = True
    forward_args: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    adapt: Any = None
    label: str = ""

    @property
    def key(self) -> str:
        return self.label or self.net_id


def _geometry_format(fmt: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A fixed-geometry cascade's input: one channel per view of ``settings["geometry"]``, its detector size."""
    from ctsynth.geometry import ProjectionGeometry

    geom = ProjectionGeometry.load_json(settings["geometry"])
    fmt["inputs"]["image"].update({"num_channels": int(geom.num_views),
                                   "spatial_shape": [int(s) for s in geom.detector_shape]})
    return fmt


#: the networks each bundle exports (see docs/README.md of each bundle for the others and why)
EXPORTS: dict[str, tuple[NetworkExport, ...]] = {
    "cascade_xray2ct": (
        NetworkExport(("inference.json",), "network_def", "fixed_geometry_data_format", "model.pt", use_trace=True,
                      overrides={"network_def#_target_": "scripts.network.FixedGeometryCascade"},
                      settings={"geometry": "network_def#geometry"}, adapt=_geometry_format),
    ),
    "slice_interp_ldm": (
        NetworkExport(("inference.json",), "network_def", "denoiser_data_format", "model.pt", export=False,
                      forward_args={"timesteps": ((1,), "int64")}),
    ),
    "xray2ctpa_vqgan": (
        NetworkExport(("train.json",), "network_def", "vqgan_data_format", "vqgan.pt", use_trace=True,
                      overrides={"network_def#_target_": "scripts.vqgan.VQGAN3DReconstructor"}),
        NetworkExport(("train_classifier.json",), "classifier_def", "classifier_data_format", "classifier.pt"),
        NetworkExport(("inference.json",), "network_def", "denoiser_data_format", "ldm.pt", export=False,
                      forward_args={"timesteps": ((1,), "int64"), "xray": ((1, 1, 256, 256), "float32")},
                      label="network_def (inference.json)"),
    ),
}
#: what is not exported to TorchScript, and why
NOT_EXPORTED: dict[str, dict[str, str]] = {
    "cascade_xray2ct": {"network_def (any geometry)": "forward takes per-study acquisition geometries (Python objects) "
                                                      "besides the radiographs; the export freezes one geometry "
                                                      "(--geometry) into a FixedGeometryCascade"},
    "slice_interp_ldm": {"network_def": "the denoiser takes the noisy latent (with the thick-latent conditioning) and "
                                        "the timestep inside a DDIM loop; ckpt_export traces one input only "
                                        "(verify_net_in_out checks it with the timestep)",
                         "autoencoder": "the MAISI autoencoder is a frozen third-party network whose forward returns "
                                        "(reconstruction, mean, sigma)"},
    "xray2ctpa_vqgan": {"network_def (inference.json)": "the denoiser takes latent, timestep and X-ray inside a DDIM "
                                                        "loop; ckpt_export traces one input only (verify_net_in_out "
                                                        "checks it with timestep and X-ray)"},
}


def verify_bundle(name: str, schema: str | Path | None = None, export_dir: str | Path | None = None,
                  models_dir: str | Path | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  device: str = "cpu", settings: Mapping[str, Any] | None = None,
                  forward_args: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> dict[str, Any]:
    """MONAI's checks of bundle ``name``: ``verify_metadata`` against ``schema`` (a local copy of MONAI's metadata
    schema; skipped without one, since fetching it needs the internet), ``verify_net_in_out`` of every network in
    :data:`EXPORTS`, and with ``export_dir`` their ``ckpt_export`` to ``EXPORT_DIR/<checkpoint stem>.ts``
    (TorchScript with metadata.json and the configs embedded) from ``MODELS/<checkpoint>``.

    Args:
        overrides: per network (:attr:`NetworkExport.key`), config overrides (e.g. a small trained network's sizes).
        settings: what a network needs from the user (:attr:`NetworkExport.settings`, e.g. ``geometry``); a network
            whose settings are missing is skipped with the reason.
        forward_args: per network (:attr:`NetworkExport.key`), shapes replacing those of
            :attr:`NetworkExport.forward_args`.

    Returns:
        What was checked, per network: ``verified`` and the ``exported`` file.
    """
    import copy

    import torch
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    root = Path(bundle_root(name))
    meta_file = root / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    report: dict[str, Any] = {"bundle": name, "metadata": "skipped: pass --schema (a local copy of MONAI's schema)",
                              "networks": {}, "not_exported": NOT_EXPORTED.get(name, {})}
    if schema is not None:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
        report["metadata"] = "valid"
    models = Path(models_dir) if models_dir else root / "models"
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    for ex in EXPORTS[name]:
        missing = [k for k in ex.settings if k not in settings]
        if missing:
            report["networks"][ex.key] = {"skipped": f"give --{' --'.join(missing)} to check and export it"}
            continue
        if ex.data_format not in meta:
            raise KeyError(f"{meta_file} lacks {ex.data_format!r}, the input/output description of {ex.key}")
        files = [str(root / "configs" / c) for c in ex.configs]
        fmt = copy.deepcopy(meta[ex.data_format])
        fmt = ex.adapt(fmt, settings) if ex.adapt is not None else fmt
        # the data format first, so that overrides of its fields (e.g. a small network's channels) apply on top
        over = {"_meta_#network_data_format": fmt, **dict((overrides or {}).get(ex.key, {})), **ex.overrides,
                **{cid: settings[k] for k, cid in ex.settings.items()}}
        shapes = (forward_args or {}).get(ex.key, {})
        extra = {}
        for k, (shape, dtype) in ex.forward_args.items():
            shape = tuple(shapes.get(k, shape))
            extra[k] = (torch.full(shape, 10, dtype=torch.int64) if dtype == "int64" else torch.rand(shape)).to(device)
        verify_net_in_out(net_id=ex.net_id, meta_file=str(meta_file), config_file=files, device=device, n=2,
                          extra_forward_args=extra, **over)
        entry: dict[str, Any] = {"verified": True}
        if export_dir is not None and ex.export:
            ckpt = models / ex.checkpoint
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt} not found: train the network first (or pass --models_dir)")
            out = Path(export_dir) / f"{Path(ex.checkpoint).stem}.ts"
            out.parent.mkdir(parents=True, exist_ok=True)
            ckpt_export(net_id=ex.net_id, filepath=str(out), ckpt_file=str(ckpt), meta_file=str(meta_file),
                        config_file=files, key_in_ckpt="network", use_trace=ex.use_trace, **over)
            entry["exported"] = str(out)
        report["networks"][ex.key] = entry
    return report
