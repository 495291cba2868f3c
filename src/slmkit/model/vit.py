"""The vision side of a LLaVA-style model: a small ViT, an MLP projector, and the splice into the decoder.

    image (B, 3, S, S) -> ViT patches (B, N, vit_dim) -> projector (B, N, dim) -> N decoder input embeddings

A ViT (Dosovitskiy et al. 2020) in nanoGPT's manner: a strided convolution cuts the image into patches, a learned
position embedding per patch, pre-norm blocks of bidirectional attention and a GELU MLP, a final LayerNorm; no
class token, since LLaVA hands the decoder every patch's features. The projector is LLaVA-1.5's two-layer MLP.
Where the prompt has the image token (`<image>`), `splice` puts the image's N embeddings in its place (LLaVA's
way), so a prompt with no image token is plain text for the same decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slmkit.model.llama import Transformer


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    dim: int = 128  # the ViT's width
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 4
    text_dim: int = 128  # the decoder's width: the projector's output
    image_token: str = "<image>"
    image_token_id: int = 0
    # the pixel normalisation the ViT was trained with (per channel, on 0..1 values)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "dim", "n_layers", "n_heads", "mlp_ratio", "text_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"vision {name}={value!r}: must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.dim % self.n_heads:
            raise ValueError(f"vision dim={self.dim} must be divisible by n_heads={self.n_heads}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision config") -> VisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}; the known ones are {sorted(known)}")
        return cls(**d)


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no mask
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.n_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) normalised pixels -> (B, n_patches, dim) patch features."""
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """LLaVA-1.5's projector: Linear, GELU, Linear, from the ViT's width to the decoder's."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.text_dim)
        self.fc2 = nn.Linear(cfg.text_dim, cfg.text_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionTower(nn.Module):
    """ViT + projector: what a LLaVA model adds to its decoder (vision.safetensors holds exactly this)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg)
        self.projector = Projector(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) normalised pixels -> (B, n_patches, text_dim) decoder input embeddings."""
        return self.projector(self.vit(pixels))

    def pixels(self, images) -> torch.Tensor:
        """uint8 (S, S, C) arrays (or one (B, S, S, C) array) -> the normalised (B, C, S, S) float tensor."""
        x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.uint8) for i in images]) if isinstance(images, list)
                             else np.array(images, dtype=np.uint8))
        if x.dim() == 3:
            x = x[None]
        x = x.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.cfg.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.cfg.std).view(1, -1, 1, 1)
        p = next(self.parameters())
        return ((x - mean) / std).to(device=p.device, dtype=p.dtype)


def splice(decoder: Transformer, ids: torch.Tensor, image_embeds: torch.Tensor | None, image_token_id: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input embeddings for token ids (B, T) whose rows hold the image token once each (or not at all),
    with each image token replaced by its row's N image embeddings (image_embeds (B, N, dim)).

    Returns (embeddings (B, T', dim), index (B, T')): index maps each position back to its token's place in `ids`
    (-1 for the image's positions), so a caller can line targets up with it. Rows must agree on whether they have
    an image (a batch is all images or all text); rows with one have it at the same place only if their prompts
    match in length before it, so callers pad on the right after the image (as `VisionTrainBatch` does).
    """
    tok = decoder.embed_tokens(ids)
    where = ids == image_token_id
    if image_embeds is None or not bool(where.any()):
        idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return tok, idx
    counts = where.sum(1)
    if not bool((counts == 1).all()):
        raise ValueError(f"each sequence needs exactly one image token, got {counts.tolist()}")
    pos = where.float().argmax(1)
    if not bool((pos == pos[0]).all()):
        raise ValueError("the image token must be at the same position in every row of a batch")
    p = int(pos[0])
    n = image_embeds.shape[1]
    embeds = torch.cat([tok[:, :p], image_embeds.to(tok.dtype), tok[:, p + 1:]], dim=1)
    T = ids.shape[1]
    idx = torch.cat([torch.arange(p), torch.full((n,), -1), torch.arange(p + 1, T)]).to(ids.device)
    return embeds, idx.expand(ids.shape[0], -1)
