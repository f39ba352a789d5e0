"""ADM U-Net (Dhariwal & Nichol), as EDM's ``DhariwalUNet`` (EDM's ImageNet-64 teacher), with SiDA's ``return_flag``.

Constructor arguments, layer names and initialisation follow EDM, so an EDM ADM state dict loads with strict=True
(ImageNet-64: 192 channels, mult [1, 2, 3, 4], 3 blocks, attention at 32/16/8, label_dim 1000: ~296M parameters).
Differences from SongUNet: the noise embedding is positional without endpoint and without the sin/cos swap, the
class embedding (``map_label``, no bias) is added after ``map_layer1``, blocks use scale-and-shift modulation with
64 channels per attention head, and the output is ``out_conv(silu(out_norm(x)))``.

The logit map is the channel mean of the last encoder block's output (the lowest resolution), as in the authors'
SiD code (mingyuanzhou/SiD, branch ``sida``, sida_training/sida_networks.py, ``DhariwalUNet_EncoderDecoder``).
"""
from __future__ import annotations

from typing import Any, Sequence, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sida_core.networks.songunet import (Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, check_return_flag,
                                         decoder_inputs, encoder_features, run_block)


class DhariwalUNet(nn.Module):
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0):
        super().__init__()
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult has {len(channel_mult)} levels)")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        init: dict[str, Any] = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero: dict[str, Any] = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs: dict[str, Any] = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        label_init: dict[str, Any] = dict(init_mode="kaiming_normal", init_weight=np.sqrt(label_dim))
        self.map_label = Linear(label_dim, emb_channels, bias=False, **label_init) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips: list[int] = [cast(int, block.out_channels) for block in self.enc.values()]

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
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = (torch.rand([tmp.shape[0], 1], device=tmp.device) >= self.label_dropout).to(tmp.dtype)
                tmp = tmp * keep
            emb = emb + self.map_label(tmp)
        return F.silu(emb)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_flag: str = "decoder",
                decoder_batch: int | None = None):
        check_return_flag(return_flag)
        ckpt = getattr(self, "activation_checkpointing", False)
        emb = self.embed(noise_labels, class_labels, augment_labels)  # fp32; each block casts its affine output, as EDM
        skips = []
        for block in self.enc.values():
            x = run_block(block, ckpt, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        if return_flag == "features":
            return encoder_features(skips)
        logits = x.float().mean(dim=1, keepdim=True)  # discriminator map: channel mean of the last encoder block
        if return_flag == "encoder":
            return logits
        x, emb, skips = decoder_inputs(decoder_batch, x, emb, skips)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = run_block(block, ckpt, x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))
        return x if return_flag == "decoder" else (x, logits)
