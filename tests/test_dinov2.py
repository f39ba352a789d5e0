"""FD-DINOv2's network, preprocessing and loader (sida_core/metrics/dinov2.py) on a tiny random DINOv2.

The tiny ViT (D 128, depth 2, 2 heads of 64, patch 14, pretrain grid 37 x 37, MLP 512) is written here as a state
dict with the official checkpoint's key names -- built by this file, not by the module -- and goes through the same
loader as the real ``dinov2_vitl14_pretrain.pth``. The references below are written independently of the module:
an explicit bicubic (A = -0.75) resampling matrix with DINOv2's scale-factor convention for the position
embeddings, and plain matmul / softmax / layer-norm / erf-GELU / LayerScale for the blocks and the whole forward.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sida_core.metrics import METRICS, extract_features, feature_space
from sida_core.metrics import dinov2 as dv

D, DEPTH, HEADS, PATCH, GRID, HIDDEN = 128, 2, 2, 14, 37, 512


def official_keys(depth: int = DEPTH) -> list[str]:
    """The parameter names of DINOv2's released ``dinov2_vit*14_pretrain.pth`` (block_chunks = 0, mlp FFN)."""
    keys = ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"):
            keys.append(f"blocks.{i}.{name}")
    return keys + ["norm.weight", "norm.bias"]


def official_shapes(d: int, depth: int, patch: int, grid: int, hidden: int) -> dict[str, tuple[int, ...]]:
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d), "mask_token": (1, d),
              "patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                       b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
    return shapes


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = official_shapes(D, DEPTH, PATCH, GRID, HIDDEN)
    sd = {}
    for k in official_keys():
        shape = shapes[k]
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            v = 0.5 + torch.rand(shape, generator=g)  # scales around 1, not all equal
        elif k == "patch_embed.proj.weight":
            v = torch.randn(shape, generator=g) / math.sqrt(3 * PATCH * PATCH)
        elif k.endswith("weight"):
            v = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            v = 0.1 * torch.randn(shape, generator=g)
        sd[k] = v
    return sd


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth"
    torch.save(tiny_state_dict(), p)
    return p


def images(n: int, seed: int, size: int = 32, kind: str = "smooth") -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: smooth blobs (upsampled 4x4 noise) or white noise."""
    g = torch.Generator().manual_seed(seed)
    if kind == "smooth":
        x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bilinear")
    else:
        x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return x.clamp(-1, 1)


# ---- independent references ----------------------------------------------------------------------------------

def cubic(d: float, a: float = -0.75) -> float:
    d = abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) resampling matrix of PyTorch's bicubic (no antialias, align_corners False) when the scale
    factor ``scale`` is given: source position (i + 0.5) / scale - 0.5, 4 taps, indices clamped to the border."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        for k in range(-1, 3):
            w[i, min(max(i0 + k, 0), n_in - 1)] += cubic(src - (i0 + k))
    return w


def reference_pos_embed(pos: torch.Tensor, gh: int, gw: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2's rule by hand: CLS position kept, the M x M grid resampled with scale (g + offset) / M per axis."""
    pe = pos[0].double().numpy()
    m = int(math.isqrt(pe.shape[0] - 1))
    grid = pe[1:].reshape(m, m, -1)
    wy = bicubic_matrix(m, gh, (gh + offset) / m)
    wx = bicubic_matrix(m, gw, (gw + offset) / m)
    out = np.einsum("ym,mnc,xn->yxc", wy, grid, wx).reshape(gh * gw, -1)
    return torch.from_numpy(np.concatenate([pe[:1], out])[None]).float()


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def reference_block(x: torch.Tensor, sd: dict, prefix: str, heads: int) -> torch.Tensor:
    n, t, d = x.shape
    hd = d // heads
    h = layer_norm(x, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"])
    qkv = h @ sd[prefix + "attn.qkv.weight"].T + sd[prefix + "attn.qkv.bias"]
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    outs = []
    for j in range(heads):
        sl = slice(j * hd, (j + 1) * hd)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
        outs.append(att @ v[..., sl])
    a = torch.cat(outs, -1) @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    x = x + sd[prefix + "ls1.gamma"] * a
    h = layer_norm(x, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"])
    h = h @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h @ sd[prefix + "mlp.fc2.weight"].T + sd[prefix + "mlp.fc2.bias"]
    return x + sd[prefix + "ls2.gamma"] * h


def reference_forward(x: torch.Tensor, sd: dict) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> CLS after the final norm, by hand: patches as row-major flattened 14x14x3 blocks."""
    n, _, hh, ww = x.shape
    gh, gw = hh // PATCH, ww // PATCH
    patches = x.reshape(n, 3, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, 3 * PATCH * PATCH)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    tok = torch.cat([sd["cls_token"].expand(n, -1, -1), tok], 1)
    pos = sd["pos_embed"] if (gh, gw) == (GRID, GRID) else reference_pos_embed(sd["pos_embed"], gh, gw)
    tok = tok + pos
    if "register_tokens" in sd:  # after CLS, once positions are added
        tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(n, -1, -1), tok[:, 1:]], 1)
    for i in range(DEPTH):
        tok = reference_block(tok, sd, f"blocks.{i}.", HEADS)
    return layer_norm(tok, sd["norm.weight"], sd["norm.bias"])[:, 0]


# ---- the network ---------------------------------------------------------------------------------------------

def test_vitl14_has_the_official_names_and_shapes():
    with torch.device("meta"):
        model = dv.DinoViT(**dv.VITL14)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_shapes(1024, 24, 14, 37, 4096)
    assert list(got) == official_keys(24) and got == want
    assert want["pos_embed"] == (1, 1370, 1024)
    assert dv.infer_arch({k: torch.empty(s, device="meta") for k, s in want.items()}) == dv.VITL14
    assert dv.extractor_id(dv.VITL14, "ab" * 32) == "dinov2-vitl14/sha256:" + "ab" * 32


def test_pos_embed_interpolation_follows_dinov2():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(1, 1 + GRID * GRID, 3, generator=g)
    assert dv.interpolate_pos_embed(pos, GRID, GRID) is pos  # identity at the pretrain grid (no resampling at all)
    for gh, gw in [(16, 16), (12, 20)]:
        got = dv.interpolate_pos_embed(pos, gh, gw)
        want = reference_pos_embed(pos, gh, gw)
        assert got.shape == (1, 1 + gh * gw, 3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the 0.1 offset is not cosmetic: sampling at the output size's positions gives other values
        by_size = F.interpolate(pos[:, 1:].reshape(1, GRID, GRID, 3).permute(0, 3, 1, 2), size=(gh, gw),
                                mode="bicubic").permute(0, 2, 3, 1).reshape(1, gh * gw, 3)
        assert (got[:, 1:] - by_size).abs().max() > 1e-3
    # register models: offset 0 -> an output size, with antialias
    reg = dv.interpolate_pos_embed(pos, 16, 16, offset=0.0, antialias=True)
    aa = F.interpolate(pos[:, 1:].reshape(1, GRID, GRID, 3).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                       antialias=True).permute(0, 2, 3, 1).reshape(1, 256, 3)
    torch.testing.assert_close(reg[:, 1:], aa)


def test_block_matches_a_plain_implementation():
    sd = tiny_state_dict(seed=3)
    block = dv.Block(D, HEADS, HIDDEN)
    block.load_state_dict({k[len("blocks.1."):]: v for k, v in sd.items() if k.startswith("blocks.1.")})
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_block(x, sd, "blocks.1.", HEADS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [224, 518])  # an interpolated grid (16 x 16) and the pretrain grid (37 x 37)
def test_forward_matches_a_plain_implementation(tiny_path, size):
    model = dv.load_dinov2(tiny_path)
    sd = torch.load(tiny_path, weights_only=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(x)
    assert got.shape == (2, D)
    torch.testing.assert_close(got, reference_forward(x, sd), atol=2e-4, rtol=2e-4)


def test_register_tokens_are_inferred_and_placed_after_cls(tmp_path):
    sd = tiny_state_dict(seed=7)
    sd["register_tokens"] = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(8))
    torch.save(sd, tmp_path / "reg.pth")
    model = dv.load_dinov2(tmp_path / "reg.pth")
    assert model.arch["num_register_tokens"] == 4
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, True)  # the hub's *_reg settings
    assert dv.dinov2_feature_space(tmp_path / "reg.pth").extractor_id.startswith(f"dinov2-vit-e{D}-d{DEPTH}-p{PATCH}-r4/")
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(x, sd), atol=2e-4, rtol=2e-4)


# ---- the feature space ---------------------------------------------------------------------------------------

def test_feature_space_features(tiny_path):
    space = dv.dinov2_feature_space(str(tiny_path))
    assert "fd_dinov2" in METRICS
    assert (space.name, space.mode, space.feature_dim) == ("fd_dinov2", "clean", D)
    sha = hashlib.sha256(tiny_path.read_bytes()).hexdigest()
    assert space.extractor_id == f"dinov2-vit-e{D}-d{DEPTH}-p{PATCH}/sha256:{sha}"
    assert feature_space("fd_dinov2", weights=str(tiny_path)).extractor_id == space.extractor_id
    assert dv.load_dinov2(tiny_path) is dv.load_dinov2(str(tiny_path))  # cached per (file, device)

    a = images(5, seed=0)
    fa = space.features(a)
    assert fa.shape == (5, D) and fa.dtype == np.float32 and np.isfinite(fa).all()
    np.testing.assert_array_equal(fa, space.features(a))
    assert np.abs(fa - space.features(images(5, seed=1))).max() > 1e-3
    assert np.abs(fa[0] - fa[1]).max() > 1e-3

    # clean-fid hands the extractor the images at their own resolution (fn_resize does not resize)
    seen = []
    extract_features(a, lambda x: seen.append(tuple(x.shape)) or torch.zeros(x.shape[0], 1), fn_resize=space.fn_resize,
                     batch_size=5)
    assert seen == [(5, 3, 32, 32)]


def test_preprocessing_is_edm2s(tiny_path):
    """uint8 grid -> 224 bicubic antialias -> /255 -> ImageNet mean/std -> model, written out here."""
    model = dv.load_dinov2(tiny_path)
    extractor = dv.DINOv2FeatureExtractor(model)
    x = torch.rand(3, 3, 40, 28, generator=torch.Generator().manual_seed(6)) * 255
    q = torch.floor(x + 0.5)
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)

    def by_hand(img, antialias=True):
        r = F.interpolate(img, size=(224, 224), mode="bicubic", antialias=antialias)
        return model((r / 255 - mean) / std)

    with torch.no_grad():
        got = extractor(x)
        torch.testing.assert_close(got, by_hand(q), atol=1e-5, rtol=1e-5)
        assert (got - by_hand(q, antialias=False)).abs().max() > 1e-3  # antialias matters when downsampling
        torch.testing.assert_close(extractor(x + 0.2 * (q - x).sign()), got)  # same uint8 image, same features


def test_fd_same_and_different(tiny_path):
    space = dv.dinov2_feature_space(tiny_path)
    a, b = images(24, seed=10), images(24, seed=11, kind="noise")
    fd_ab = space.fd(a, b)
    fd_aa = space.fd(a, a)
    assert fd_ab > 1.0
    assert fd_aa < 1e-3 * fd_ab


# ---- weights that must be refused ----------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _refused(path, *needles: str) -> str:
    with pytest.raises(dv.DINOv2WeightsError) as e:
        dv.dinov2_feature_space(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    # control: this file really runs its payload when unpickled without weights_only
    control_marker = tmp_path / "control"
    torch.save({"w": _Payload(control_marker)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "pwned"
    sd = tiny_state_dict()
    sd["norm.weight"] = _Payload(marker)
    torch.save(sd, tmp_path / "evil.pth")
    _refused(tmp_path / "evil.pth", "not a loadable state dict")
    assert not marker.exists()


def test_bad_files_are_one_clear_error(tmp_path, tiny_path):
    data = tiny_path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "truncated.pth", "not a loadable state dict")

    _refused(tmp_path / "absent.pth", "not found")

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    _refused(tmp_path / "list.pth", "not a state dict")
    torch.save({"model": tiny_state_dict()}, tmp_path / "nested.pth")
    _refused(tmp_path / "nested.pth", "'model'", "not a state dict")

    sd = tiny_state_dict()
    del sd["norm.weight"]
    torch.save(sd, tmp_path / "no_norm.pth")
    _refused(tmp_path / "no_norm.pth", "missing key 'norm.weight'")

    sd = tiny_state_dict()
    sd["blocks.1.mlp.fc2.weight"] = sd["blocks.1.mlp.fc2.weight"].T.contiguous()
    torch.save(sd, tmp_path / "shape.pth")
    _refused(tmp_path / "shape.pth", "'blocks.1.mlp.fc2.weight'", f"({HIDDEN}, {D})", f"({D}, {HIDDEN})")

    sd = tiny_state_dict()
    sd["head.weight"] = torch.zeros(10, D)
    torch.save(sd, tmp_path / "extra.pth")
    _refused(tmp_path / "extra.pth", "unexpected key 'head.weight'")

    sd = tiny_state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, :-1]
    torch.save(sd, tmp_path / "pos.pth")
    _refused(tmp_path / "pos.pth", "'pos_embed'")


def test_fd_dinov2_needs_its_weights_named():
    with pytest.raises(dv.DINOv2WeightsError, match=r"metric\.dinov2 must name a local or s3:// path to "
                                                    r"dinov2_vitl14_pretrain\.pth"):
        feature_space("fd_dinov2")
    with pytest.raises(ValueError, match="clean"):
        feature_space("fd_dinov2", protocol="legacy_tensorflow", weights="x.pth")
