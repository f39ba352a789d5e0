"""FD-DINOv2 (EDM2's second metric) offline: a DINOv2 ViT written for this project, loading the official state dict.

**Network.** :class:`DinoViT` is the DINOv2 backbone of ``facebookresearch/dinov2`` (Apache-2.0; re-written here,
inference only) with the parameter names of its released checkpoints, so ``dinov2_vitl14_pretrain.pth`` (a plain
``torch.save`` of the state dict) loads with ``strict=True``:

``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + M*M, D), ``mask_token`` (1, D), optional ``register_tokens``
(1, R, D), ``patch_embed.proj.{weight,bias}`` (Conv2d 3 -> D, kernel = stride = patch), per block ``i``
``blocks.{i}.norm1``, ``.attn.qkv`` (D -> 3D, bias), ``.attn.proj``, ``.ls1.gamma``, ``.norm2``, ``.mlp.fc1``
(D -> hidden), ``.mlp.fc2``, ``.ls2.gamma``; then ``norm``. ViT-L/14: D 1024, depth 24, 16 heads, patch 14,
pretrained at 518 px (M = 37), MLP hidden 4096, LayerScale, LayerNorm eps 1e-6, exact GELU.

Block (inference): ``x = x + ls1(attn(norm1(x)))``, ``x = x + ls2(mlp(norm2(x)))``; attention is plain multi-head
softmax(q k^T / sqrt(d_head)) v. Tokens: patch embeddings with the CLS token in front, plus the position embedding
(interpolated to the input's patch grid, see :func:`interpolate_pos_embed`); register tokens (if any) are inserted
after CLS once positions are added. Output: the CLS token after the final norm (DINOv2's ``x_norm_clstoken``, what
``model(x)`` returns since its head is the identity).

Architecture from the state dict's shapes: D and patch from ``patch_embed.proj.weight``, M from ``pos_embed``, depth
from the ``blocks.{i}`` indices, hidden from ``blocks.0.mlp.fc1.weight``, R from ``register_tokens``. The head count
is not visible in any shape: every released DINOv2 (S/B/L/g) uses 64-wide heads, so heads = D / 64. Only the ``mlp``
feed-forward is supported (ViT-g's SwiGLU ``mlp.w12`` / ``mlp.w3`` keys are refused as unexpected).

**Position embeddings** as DINOv2's ``interpolate_pos_encoding`` with the torch.hub settings of ``dinov2_vitl14``
(``_make_dinov2_model`` defaults ``interpolate_offset=0.1, interpolate_antialias=False`` -- the same in the hub code
EDM2's ``torch.hub.load('facebookresearch/dinov2:main', 'dinov2_vitl14')`` got, before and after the offset became
a parameter): unchanged at the pretrain grid; otherwise the M x M patch grid is resized bicubically (no
antialias) with ``scale_factor = ((h0 + 0.1) / M, (w0 + 0.1) / M)`` -- the scale factor, not the output size,
drives the sampling positions, and float32 is used. The ``_reg`` hub models use offset 0 (an output ``size``)
and antialias; a state dict with ``register_tokens`` gets those.

**Preprocessing** as EDM2's ``DINOv2Detector`` (``calculate_metrics.py``, resize_mode ``torch``, its default),
which receives NCHW uint8 RGB: ``F.interpolate(x.float(), size=(224, 224), mode='bicubic', antialias=True)`` (no
clamp after), ``/ 255``, minus ImageNet mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225), then the model.
Our extractor gets clean-fid's float [0, 255] images (from tensors: not quantised), so it first rounds them to the
uint8 grid EDM2's generated images are on (``floor(x + 0.5)`` clamped to [0, 255], which is EDM's
``(x * 127.5 + 128).clip(0, 255).to(uint8)``; a no-op on images read from files).

**clean-fid**: the feature space's ``fn_resize`` is the identity (to float32, which clean-fid's folder loader needs
to keep [0, 255] -- it divides uint8 by 255 only), so ``get_model_features`` / folder scoring hand the extractor
the images at their own resolution and the only resize is EDM2's, inside the extractor. Mode is ``clean``; in
``legacy_tensorflow`` clean-fid would skip ``fn_resize``, which is why that mode is refused.

**Loading** never executes code: ``torch.load(..., weights_only=True)``. A file that is missing, not loadable,
not a ``str -> Tensor`` mapping, or has a missing / unexpected key or a wrong shape is one
:class:`DINOv2WeightsError` naming the file and the first offending key.

**Checked** (2026-12-02, once, not in CI: the code is not a dependency) against DINOv2's own modules (PyPI
``dinov2==0.0.1.dev2``, ``vit_large`` / ``vit_base`` with patch 14, img 518, LayerScale 1.0, block_chunks 0, every
parameter perturbed): their ``state_dict()`` loads here strictly with the same key order, and the CLS features
agree to 3e-6 (values up to ~4) at 224 x 224, 518 x 518 and 168 x 252, and through EDM2's preprocessing.
No check against the real pretrained weights was possible offline.
"""
from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .frechet import FeatureSpace
from .inception import sha256_file

NAME = "fd_dinov2"
HEAD_DIM = 64  # every released DINOv2 (ViT-S/B/L/g 14): 384/6, 768/12, 1024/16, 1536/24
INPUT_SIZE = 224  # EDM2's DINOv2Detector resize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
HUB_OFFSET, HUB_ANTIALIAS = 0.1, False  # dinov2_vitl14 (torch.hub _make_dinov2_model defaults)
REG_OFFSET, REG_ANTIALIAS = 0.0, True  # dinov2_vit*14_reg
WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
VITL14 = dict(embed_dim=1024, depth=24, num_heads=16, patch_size=14, pos_grid=37, mlp_hidden=4096,
              num_register_tokens=0)

_MODELS: dict[tuple[str, int, int, str], "DinoViT"] = {}
_LOCK = threading.Lock()


class DINOv2WeightsError(RuntimeError):
    """DINOv2 weights are missing, not a loadable state dict, or do not fit the network (the message names the
    file and the first offending key)."""


# ---------------------------------------------------------------------------------------------------------------
# The network.

class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, h*w, D), row-major over the patch grid


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, offset: float = HUB_OFFSET,
                          antialias: bool = HUB_ANTIALIAS) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding``: (1, 1 + M*M, D) pretrain embeddings -> (1, 1 + grid_h*grid_w, D).

    The input itself at the pretrain grid (grid_h == grid_w == M); otherwise the CLS position is kept and the
    M x M patch grid is resized bicubically in float32, with ``scale_factor ((grid_h + offset) / M,
    (grid_w + offset) / M)`` if ``offset`` (the scale factor sets the sampling positions) else ``size``.
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if grid_h == m and grid_w == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    grid = pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(grid, scale_factor=(float(grid_h + offset) / m, float(grid_w + offset) / m),
                             mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=antialias)
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, "
                           f"expected {(grid_h, grid_w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([pe[:, :1], grid], dim=1).to(pos_embed.dtype)


class DinoViT(nn.Module):
    """DINOv2 backbone (inference): normalised NCHW RGB, H and W multiples of the patch -> (N, D) CLS features."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, patch_size: int = 14,
                 pos_grid: int = 37, mlp_hidden: int = 4096, num_register_tokens: int = 0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.pos_grid, self.mlp_hidden = patch_size, pos_grid, mlp_hidden
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = REG_OFFSET if num_register_tokens else HUB_OFFSET
        self.interpolate_antialias = REG_ANTIALIAS if num_register_tokens else HUB_ANTIALIAS

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # training only (iBOT masking); in the checkpoint
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    @property
    def arch(self) -> dict:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, patch_size=self.patch_size,
                    pos_grid=self.pos_grid, mlp_hidden=self.mlp_hidden, num_register_tokens=self.num_register_tokens)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + CLS (+ register) tokens with positions, (N, 1 + R + h*w, D)."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or h % p or w % p:
            raise ValueError(f"DINOv2 expects (N, 3, H, W) with H, W multiples of {p}, got {tuple(x.shape)}")
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + interpolate_pos_embed(self.pos_embed, h // p, w // p, self.interpolate_offset,
                                      self.interpolate_antialias)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Loading.

def _fail(path: Union[str, Path], why: str) -> DINOv2WeightsError:
    return DINOv2WeightsError(f"DINOv2 weights {str(path)!r}: {why} (expected the official {WEIGHTS_FILE}, a plain "
                              f"torch.save of DINOv2's state dict)")


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The file's state dict, read with ``torch.load(weights_only=True)`` (never executes code from the file)."""
    p = Path(path)
    if not p.is_file():
        raise _fail(path, "file not found")
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (refused globals), truncated zip / pickle, not a torch file at all
        raise _fail(path, f"not a loadable state dict; torch.load(weights_only=True) says "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(sd, Mapping):
        raise _fail(path, f"holds a {type(sd).__name__}, not a state dict")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _fail(path, f"key {k!r} maps to a {type(v).__name__}, not a tensor: not a state dict")
    return dict(sd)


def _shape(path, sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise _fail(path, f"missing key {key!r}")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise _fail(path, f"key {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_arch(sd: Mapping[str, torch.Tensor], path: Union[str, Path] = "<state dict>") -> dict:
    """DinoViT keyword arguments from the state dict's shapes (heads = D / 64, see the module docstring)."""
    dim, chans, p, p2 = _shape(path, sd, "patch_embed.proj.weight", 4)
    if chans != 3 or p != p2:
        raise _fail(path, f"key 'patch_embed.proj.weight' has shape {(dim, chans, p, p2)}, expected (D, 3, P, P)")
    one, n_pos, d2 = _shape(path, sd, "pos_embed", 3)
    m = int(math.isqrt(max(n_pos - 1, 0)))
    if one != 1 or d2 != dim or n_pos < 2 or m * m != n_pos - 1:
        raise _fail(path, f"key 'pos_embed' has shape {(one, n_pos, d2)}, expected (1, 1 + M*M, {dim})")
    if dim % HEAD_DIM:
        raise _fail(path, f"embedding width {dim} (from 'patch_embed.proj.weight') is not a multiple of DINOv2's "
                          f"head width {HEAD_DIM}")
    indices = {int(mt.group(1)) for k in sd if (mt := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(indices) + 1 if indices else 0
    if depth == 0:
        raise _fail(path, "missing key 'blocks.0.norm1.weight' (no transformer blocks)")
    hidden = _shape(path, sd, "blocks.0.mlp.fc1.weight", 2)[0]
    regs = _shape(path, sd, "register_tokens", 3)[1] if "register_tokens" in sd else 0
    return dict(embed_dim=dim, depth=depth, num_heads=dim // HEAD_DIM, patch_size=p, pos_grid=m, mlp_hidden=hidden,
                num_register_tokens=regs)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Union[str, Path]) -> None:
    """One error for the first missing key (in the network's order), wrong shape, or unexpected key."""
    want = model.state_dict()
    for k, v in want.items():
        if k not in sd:
            raise _fail(path, f"missing key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise _fail(path, f"key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        if not sd[k].is_floating_point():
            raise _fail(path, f"key {k!r} has dtype {sd[k].dtype}, expected floating point")
    for k in sd:
        if k not in want:
            raise _fail(path, f"unexpected key {k!r}")


def load_dinov2(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> DinoViT:
    """The network of the state dict at ``path`` (architecture from its shapes), in eval mode, float32, on
    ``device``; cached per process by (real path, size, mtime, device)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise _fail(path, "file not found")
    p = p.resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, str(torch.device(device)))
    with _LOCK:
        if key not in _MODELS:
            sd = read_state_dict(p)
            arch = infer_arch(sd, p)
            with torch.device("meta"):
                model = DinoViT(**arch)  # shapes only; the state dict supplies every value
            check_state_dict(model, sd, p)
            model = model.to_empty(device="cpu")
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
            _MODELS[key] = model.to(device).eval().requires_grad_(False)
        return _MODELS[key]


# ---------------------------------------------------------------------------------------------------------------
# The feature space.

class DINOv2FeatureExtractor(nn.Module):
    """clean-fid feature extractor: NCHW RGB float in [0, 255] at any resolution -> (N, D) float32 CLS features,
    through EDM2's ``DINOv2Detector`` preprocessing (module docstring)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: DinoViT, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.model = model
        self.device = torch.device(device)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv2 expects (N, 3, H, W) RGB images in [0, 255], got {tuple(x.shape)}")
        x = torch.floor(x.to(self.device, torch.float32) + 0.5).clamp(0, 255)  # the uint8 grid EDM2's images are on
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean.to(self.device)) / self.std.to(self.device)
        return self.model(x).float()


def keep_resolution(img: np.ndarray) -> np.ndarray:
    """clean-fid ``fn_resize`` that does not resize: HWC [0, 255] -> the same values as float32 (clean-fid's folder
    loader keeps float32 as is; uint8 it would divide by 255)."""
    return np.asarray(img, dtype=np.float32)


def extractor_id(arch: dict, sha256: str) -> str:
    """``dinov2-vitl14/sha256:<hash>`` for the official ViT-L/14 shapes, else ``dinov2-vit-e{D}-d{depth}-p{P}[-r{R}]``."""
    if arch == VITL14:
        name = "dinov2-vitl14"
    else:
        name = f"dinov2-vit-e{arch['embed_dim']}-d{arch['depth']}-p{arch['patch_size']}"
        if arch["num_register_tokens"]:
            name += f"-r{arch['num_register_tokens']}"
    return f"{name}/sha256:{sha256}"


def dinov2_feature_space(weights: Union[str, Path, None], device: Union[str, torch.device] = "cpu",
                         batch_size: int = 64) -> FeatureSpace:
    """The ``fd_dinov2`` feature space (clean-fid ``clean`` mode, identity ``fn_resize``, EDM2's preprocessing
    inside the extractor) of the DINOv2 state dict at ``weights``, a local file (``s3://`` paths are fetched to
    the node by the caller). ``extractor_id`` records the file's sha256. Batch size 64 as EDM2's default."""
    if weights is None or str(weights) == "":
        raise DINOv2WeightsError(f"fd_dinov2 needs DINOv2 weights: metric.dinov2 must name a local or s3:// path to "
                                 f"{WEIGHTS_FILE} (nothing is downloaded at run time)")
    if str(weights).startswith("s3://"):
        raise DINOv2WeightsError(f"DINOv2 weights {str(weights)!r}: sida_core reads local files only; fetch the "
                                 f"s3:// object to the node first and pass its local path")
    device = torch.device(device)
    model = load_dinov2(weights, device)
    return FeatureSpace(NAME, DINOv2FeatureExtractor(model, device), extractor_id=extractor_id(model.arch,
                        sha256_file(Path(weights).expanduser())), mode="clean", fn_resize=keep_resolution,
                        batch_size=batch_size, feature_dim=model.embed_dim)


__all__ = ["DINOv2FeatureExtractor", "DINOv2WeightsError", "DinoViT", "dinov2_feature_space", "extractor_id",
           "infer_arch", "interpolate_pos_embed", "keep_resolution", "load_dinov2", "read_state_dict"]
