"""Small MLP backbone with an encoder/decoder split (for analytic tests and low-dimensional data).

The encoder maps (x, noise embedding, label) to a hidden feature vector h of ``hidden`` channels; the
logit map is its channel mean, shape (B, 1, 1, 1), exactly as for the U-Net (no extra parameters).
The decoder maps [h, noise embedding] back to the data shape.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sida_core.networks.songunet import PositionalEmbedding, check_return_flag, decoder_inputs


class MLPNet(nn.Module):
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 hidden: int = 256, enc_layers: int = 2, dec_layers: int = 2, emb_channels: int = 64):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.dim = in_channels * img_resolution * img_resolution
        self.out_dim = out_channels * img_resolution * img_resolution
        self.map_noise = PositionalEmbedding(emb_channels)
        self.map_label = nn.Linear(label_dim, emb_channels) if label_dim else None
        self.map_emb = nn.Linear(emb_channels, emb_channels)
        enc = [nn.Linear(self.dim + emb_channels, hidden)]
        enc += [nn.Linear(hidden + emb_channels, hidden) for _ in range(enc_layers - 1)]
        self.enc = nn.ModuleList(enc)
        self.dec = nn.ModuleList([nn.Linear(hidden + emb_channels, hidden) for _ in range(dec_layers)])
        self.out = nn.Linear(hidden, self.out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_flag: str = "decoder",
                decoder_batch: int | None = None):
        check_return_flag(return_flag)
        b = x.shape[0]
        emb = self.map_noise(noise_labels)
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1]))
        emb = F.silu(self.map_emb(emb)).to(x.dtype)
        h = x.reshape(b, -1)
        hidden = []
        for layer in self.enc:
            h = F.silu(layer(torch.cat([h, emb], dim=1)))
            hidden.append(h.reshape(b, -1, 1, 1))
        if return_flag == "features":
            return hidden  # each encoder layer's output as a B x hidden x 1 x 1 map
        logits = h.float().mean(dim=1).reshape(b, 1, 1, 1)
        if return_flag == "encoder":
            return logits
        y, emb, _ = decoder_inputs(decoder_batch, h, emb, [])
        b = y.shape[0]
        for layer in self.dec:
            y = F.silu(layer(torch.cat([y, emb], dim=1))) + y
        y = self.out(y).reshape(b, self.out_channels, self.img_resolution, self.img_resolution)
        return y if return_flag == "decoder" else (y, logits)
