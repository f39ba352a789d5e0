"""EDM2's magnitude-preserving U-Net and preconditioner, with the SiDA ``return_flag`` (SPEC.md "Networks", "EDM2").

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), config G.
Written from the paper and the layout of NVlabs/edm2 ``training/networks_edm2.py``; constructor arguments,
module and parameter/buffer names equal EDM2's (``unet.enc['64x64_block0'].conv_res0.weight``, ``unet.out_gain``,
``logvar_fourier.freqs``, ...), so an EDM2 state dict loads with ``strict=True``.

Differences from EDM2, on purpose:
  * :class:`MPConv` normalises its weight with gradient in forward but never writes to it. Forced weight
    normalisation (EDM2 eq. 66) is the explicit step :func:`force_weight_norm_`, called by the trainer before the
    forwards of each update (SPEC "EDM2": SiDA's psi step runs f_psi twice before one backward, and an in-place
    weight change between the two makes autograd fail).
  * ``use_fp16`` is accepted and recorded only: the compute precision is the caller's autocast (the run's
    ``precision``), so the network never casts by itself; master weights stay float32. (Under fp16 autocast the
    embedding and logvar matmuls run in fp16 too, where EDM2 keeps them in fp32; in fp32 outputs match EDM2's
    bit for bit.)
  * ``return_flag`` (SiDA): the logit map is the channel mean of the lowest-resolution encoder output, as in the
    authors' SiD code (``sida_training_edm2/sida_networks_edm2.py``, ``UNet_EncoderDecoder``).
"""
from __future__ import annotations

import math
from typing import Sequence, cast

import torch
from torch import nn
from torch.nn import functional as F

from sida_core import edm
from sida_core.networks.songunet import check_return_flag, decoder_inputs, encoder_features, run_block
from sida_core.networks.precond import precond_inputs


# ----------------------------------------------------------------------------------------------- MP primitives
def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(N)) over ``dim`` (default: all but dim 0), N = elements per slice (EDM2 eq. 66 step).

    Each slice gets unit RMS, i.e. L2 norm sqrt(N) (= sqrt(fan-in) for a weight's output channel), up to ``eps``.
    """
    dims = list(range(1, x.ndim)) if dim is None else dim
    l2 = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    # eps + ||x|| / sqrt(N) in one fused op (numel ratio = 1 / N): rounds exactly as EDM2, so outputs match bit for bit
    denom = torch.add(eps, l2, alpha=math.sqrt(l2.numel() / x.numel()))
    return x / denom.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (EDM2 eq. 81): SiLU(x) / 0.596."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (EDM2 eq. 88): ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (EDM2 eq. 103), balance ``t`` between a (0) and b (1)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Depthwise 2x down- or up-sampling with the separable filter ``f`` (normalised to sum 1); 'keep' = identity."""
    if mode == "keep":
        return x
    if len(f) % 2:
        raise ValueError(f"resample filter must have even length, got {list(f)}")
    f1 = torch.as_tensor(f, dtype=torch.float32)
    f1 = f1 / f1.sum()
    k = torch.outer(f1, f1).to(device=x.device, dtype=x.dtype)[None, None].tile(x.shape[1], 1, 1, 1)
    pad = (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, k, groups=x.shape[1], stride=2, padding=(pad,))
    if mode == "up":
        return F.conv_transpose2d(x, k * 4, groups=x.shape[1], stride=2, padding=(pad,))
    raise ValueError(f"resample mode must be keep, down or up, got {mode!r}")


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features (EDM2 eq. 75): sqrt(2) cos(2 pi (f x + phi)), fixed random f, phi."""

    freqs: torch.Tensor  # buffers (registered in __init__)
    phases: torch.Tensor

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [kh, kw]) or linear layer (kernel []) (EDM2 eq. 47), no bias.

    Effective weight = gain * normalize(w) / sqrt(fan_in), normalised with gradient on every call. Forward never
    writes to ``weight``: forced weight normalisation is :func:`force_weight_norm_`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = normalize(self.weight.float())
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


@torch.no_grad()
def force_weight_norm_(net: nn.Module) -> int:
    """Forced weight normalisation (EDM2 eq. 66; SPEC "EDM2"): w <- normalize(w) for every :class:`MPConv` in ``net``.

    Call on trainable nets only, before an update's forwards. Returns how many weights were re-normalised (0 for a
    net without MPConv layers, which is left untouched).
    """
    n = 0
    for m in net.modules():
        if isinstance(m, MPConv):
            m.weight.copy_(normalize(m.weight.float()))
            n += 1
    return n


# ----------------------------------------------------------------------------------------------- U-Net
class Block(nn.Module):
    """EDM2 U-Net encoder ('enc') or decoder ('dec') block with optional self-attention (EDM2 Figure 21)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        # residual branch, modulated by the embedding: c = 1 + emb_gain * (W emb)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            # channels of attn_qkv are laid out as (head, channel, q/k/v), as in EDM2
            assert self.attn_qkv is not None and self.attn_proj is not None  # built whenever num_heads > 0
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm per head, then split
            a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", a, v)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2 U-Net F(x; c_noise, c) (config G). ``return_flag`` as in SiDA: the logit map is the channel mean of the
    last encoder block's output (the lowest resolution), fp32, B x 1 x h x w; 'encoder' skips the decoder."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # + a constant ones channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)

        self.dec = nn.ModuleDict()
        skips: list[int] = [cast(int, block.out_channels) for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                return_flag: str = "decoder", decoder_batch: int | None = None):
        check_return_flag(return_flag)
        ckpt = getattr(self, "activation_checkpointing", False)
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = cast(torch.Tensor, class_labels)  # a label-conditional net needs labels (EDM2Precond supplies zeros)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else run_block(block, ckpt, x, emb)
            skips.append(x)
        if return_flag == "features":
            return encoder_features(skips)
        logits = x.float().mean(dim=1, keepdim=True)  # discriminator map (SiDA), no extra parameters
        if return_flag == "encoder":
            return logits

        x, emb, skips = decoder_inputs(decoder_batch, x, emb, skips)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = run_block(block, ckpt, x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x if return_flag == "decoder" else (x, logits)


# ----------------------------------------------------------------------------------------------- preconditioner
class EDM2Precond(nn.Module):
    """EDM2's ``Precond``: D(x; sigma, c) = c_skip x + c_out F(c_in x; ln(sigma)/4, c) (SPEC "Networks"), plus the
    uncertainty head u(sigma) = logvar_linear(logvar_fourier(c_noise)) of EDM2 eq. 21.

    ``forward(x, sigma, class_labels, return_flag, return_logvar)`` returns D(x) ('decoder'), the logit map
    ('encoder') or (D(x), logits) ('encoder_decoder'); with ``return_logvar`` the B x 1 x 1 x 1 logvar u(sigma) is
    appended: (D, u), (logits, u) or (D, logits, u). Outputs are float32. ``use_fp16`` is recorded, not applied
    (precision = the caller's autocast).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = edm.SIGMA_DATA, logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        # logvar_channels=0: no head (the SiD authors' EDM2 generators, EDM_2_Precond_Generator, have none)
        self.logvar_fourier = MPFourier(logvar_channels) if logvar_channels else None
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[]) if logvar_channels else None

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, return_flag: str = "decoder",
                return_logvar: bool = False, decoder_batch: int | None = None):
        check_return_flag(return_flag)
        x = x.float()
        sigma, class_labels = precond_inputs(x, sigma, class_labels, self.label_dim)
        if class_labels is not None:
            class_labels = class_labels.float().reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = edm.precond_coefficients(sigma, self.sigma_data)
        s = lambda v: edm.expand_sigma(v, x)  # noqa: E731 - broadcast (B,) against x
        out = self.unet(x * s(c_in), c_noise, class_labels, return_flag=return_flag, decoder_batch=decoder_batch)
        if return_flag == "features":
            return out
        n = x.shape[0] if decoder_batch is None else int(decoder_batch)  # decoder output (and u) for the first n only
        result: tuple[torch.Tensor, ...]
        if return_flag == "encoder":
            result = (out,)
        else:
            f_x, logits = out if return_flag == "encoder_decoder" else (out, None)
            d_x = s(c_skip)[:n] * x[:n] + s(c_out)[:n] * f_x.float()
            result = (d_x,) if logits is None else (d_x, logits)
        if return_logvar:
            result += (self.logvar(c_noise[:n]),)
        return result[0] if len(result) == 1 else result

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """u(sigma) of EDM2 eq. 21 as B x 1 x 1 x 1 float32, from c_noise = ln(sigma)/4."""
        if self.logvar_linear is None:
            raise ValueError("this EDM2 net has no logvar head (built with logvar_channels=0)")
        assert self.logvar_fourier is not None  # built together with logvar_linear
        return self.logvar_linear(self.logvar_fourier(c_noise)).float().reshape(-1, 1, 1, 1)


__all__ = ["Block", "EDM2Precond", "MPConv", "MPFourier", "UNet", "force_weight_norm_", "mp_cat", "mp_silu", "mp_sum",
           "normalize", "resample"]
