"""DDPM++ / NCSN++-style U-Net (the EDM "SongUNet" family) with a SiDA ``return_flag``.

Layout, layer naming and initialisation follow EDM's SongUNet (DDPM++ and NCSN++ configurations), so that
an EDM teacher's state dict loads with strict=True (e.g. CIFAR-10 DDPM++: 128 channels, mult [2, 2, 2],
4 blocks, attention at 16x16: 55.73M parameters); tiny CPU nets use the same code with fewer channels.
The building blocks (Linear, Conv2d, GroupNorm, UNetBlock, PositionalEmbedding, FourierEmbedding) are
shared with the ADM backbone in ``adm.py``.

``return_flag`` (SiDA section 4, "Joint score estimation and discrimination"):
  * ``"decoder"``          -> the network output F(x) (B, C, H, W)
  * ``"encoder"``          -> the discriminator logit map only: channel mean of the last encoder block's
                              output, (B, 1, h, w) in fp32; the decoder is skipped
  * ``"encoder_decoder"``  -> (F(x), logit map) from one pass
No parameters are added for the discriminator.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

RETURN_FLAGS = ("decoder", "encoder", "encoder_decoder", "features")


def check_return_flag(return_flag: str) -> None:
    if return_flag not in RETURN_FLAGS:
        raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}")


def encoder_features(skips: list) -> list:
    """``return_flag='features'``: the encoder's output at each resolution (the last block there), highest
    resolution first -- the per-resolution feature maps of ADD's discriminator (docs/methods/add.md)."""
    last: dict = {}
    for t in skips:
        last[tuple(t.shape[2:])] = t  # insertion order = first appearance = high to low resolution
    return list(last.values())


def decoder_inputs(decoder_batch: int | None, x, emb, skips):
    """The decoder's inputs restricted to the first ``decoder_batch`` samples (None: all of them).

    SiDA's fake-score step needs f_psi's denoised output for the fake half of its batch only and the logit map for
    both halves; with ``decoder_batch`` one encoder pass serves the concatenated [fake; real] batch and the decoder
    runs on the fake half alone (``performance.single_psi_forward``). Exact per sample: every layer of these nets
    (convolution, GroupNorm, per-sample attention) treats samples independently."""
    if decoder_batch is None:
        return x, emb, skips
    n = int(decoder_batch)
    return x[:n], emb[:n], [s[:n] for s in skips]


def run_block(block: nn.Module, checkpointed: bool, *args):
    """``block(*args)``, recomputed in the backward pass when ``checkpointed`` and gradients are being recorded
    (activation checkpointing, ``performance.activation_checkpointing``: less memory, one more forward)."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _init_weight(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "xavier_uniform",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_init_weight([out_features, in_features], init_mode, in_features, out_features) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], init_mode, in_features, out_features) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        return x.add_(self.bias.to(x.dtype)) if self.bias is not None else x


class Conv2d(nn.Module):
    """3x3 / 1x1 convolution with optional FIR up- or down-sampling (EDM's resample filter).

    ``kernel=0`` gives a weightless resampler. ``fused_resample`` (NCSN++'s ``aux_residual``) convolves at the
    input resolution and then filters-and-strides (down), or upsamples straight into the padded convolution (up).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "xavier_uniform", init_weight: float = 1.0, init_bias: float = 0.0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        w_shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(_init_weight(w_shape, init_mode, fan_in, fan_out) * init_weight) if kernel else None
        b_shape = [out_channels]
        self.bias = nn.Parameter(_init_weight(b_shape, init_mode, fan_in, fan_out) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                       padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype),
                            eps=self.eps)


class UNetBlock(nn.Module):
    """Residual block with timestep-embedding modulation and optional self-attention.

    DDPM++/NCSN++ use additive modulation (``adaptive_scale=False``), one head and skip_scale sqrt(1/2);
    ADM uses scale-and-shift, ``out_channels // channels_per_head`` heads (none below 64 channels, as EDM) and
    skip_scale 1.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        init_zero = init_zero or dict(init_weight=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add_(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            attn = torch.einsum("nqc,nkc->nqk", q.transpose(1, 2).float(), (k / math.sqrt(k.shape[1])).transpose(1, 2).float())
            attn = attn.softmax(dim=2).to(v.dtype)
            a = torch.einsum("nqk,nck->ncq", attn, v)
            x = self.proj(a.reshape(b, c, h, w)).add_(x)
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        freqs = torch.arange(0, self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.float().ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.float().ger((2 * np.pi * self.freqs))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """EDM's SongUNet: DDPM++ (defaults) and NCSN++ (``embedding_type='fourier'``, ``channel_mult_noise=2``,
    ``encoder_type='residual'``, ``resample_filter=[1, 3, 3, 1]``), with EDM's constructor and parameter names.

    ``encoder_type``: ``'skip'`` adds, at every level below the top, ``aux_down`` (the input image, filtered and
    downsampled) and ``aux_skip`` (1x1 conv of it) added to the ``_down`` block's output; ``'residual'`` adds
    ``aux_residual`` (3x3 conv with fused downsampling of the running auxiliary path), averaged with the ``_down``
    output by 1/sqrt(2) and carried on as the new auxiliary path. ``decoder_type='skip'`` emits an output image
    (``aux_norm`` -> ``aux_conv``) at every level and sums them, upsampling the running sum with ``aux_up``.

    ``forward(x, noise_labels, class_labels, augment_labels, return_flag)``; see the module docstring for the
    flags. The logit map is read after the whole encoder, i.e. from the last ``{res}x{res}_block{i}`` at the
    lowest resolution: the skip/residual auxiliaries of a level are mixed in right after its ``_down`` block,
    before its blocks. This is where the authors' SiD code (mingyuanzhou/SiD, branch ``sida``,
    sida_training/sida_networks.py, ``SongUNet_EncoderDecoder.forward``) takes ``x.mean(dim=1, keepdim=True)``.
    Their ``'encoder'`` path stops recording skips, so with the skip/residual encoders it would fail at the
    first ``aux_skip``/``aux_residual`` (``skips[-1]`` of an empty list); here the skips are always recorded
    (references only), so all three flags work for every encoder type and give the same map.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult has {len(channel_mult)} levels)")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init: dict[str, Any] = dict(init_mode="xavier_uniform")
        init_zero: dict[str, Any] = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn: dict[str, Any] = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs: dict[str, Any] = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                                            eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                                            adaptive_scale=False, init=init, init_zero=init_zero, init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips: list[int] = [cast(int, block.out_channels) for name, block in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # swap sin/cos as EDM does
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = (torch.rand([tmp.shape[0], 1], device=tmp.device) >= self.label_dropout).to(tmp.dtype)
                tmp = tmp * keep
            emb = emb + self.map_label(tmp * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_flag: str = "decoder",
                decoder_batch: int | None = None):
        check_return_flag(return_flag)
        ckpt = getattr(self, "activation_checkpointing", False)
        emb = self.embed(noise_labels, class_labels, augment_labels).to(x.dtype)
        skips: list[torch.Tensor] = []
        aux: torch.Tensor | None = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = run_block(block, ckpt, x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        if return_flag == "features":
            return encoder_features(skips)
        logits = x.float().mean(dim=1, keepdim=True)  # discriminator map: channel mean of the last encoder block
        if return_flag == "encoder":
            return logits
        x, emb, skips = decoder_inputs(decoder_batch, x, emb, skips)
        aux = None
        tmp: torch.Tensor | None = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                assert tmp is not None  # every level's aux_norm comes right before its aux_conv
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = run_block(block, ckpt, x, emb)
        if return_flag == "decoder":
            return aux
        return aux, logits
