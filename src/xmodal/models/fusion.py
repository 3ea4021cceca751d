"""Cross-modal fusion: from an image and a caption to one fused vector.

- :class:`PooledFusion` (the ``seed`` preset's fusion): one ``MultiheadAttention`` over
  the stacked [image, text] pair of projected vectors, returning the first position.
- :class:`CrossAttentionFusion` (the default) runs pre-norm transformer layers in which the
  caption's tokens attend to each other and to the image's grid tokens; padding is masked, so
  the fused vector does not depend on how much padding a batch carries. With
  ``grid_positions`` the image tokens carry a fixed 2-D sine-cosine code of where they lie in
  the grid: attention by itself is blind to token order, so without it a convolutional map's
  tokens tell what is in the image but not where (which of two people is on the left).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.checkpointing import checkpoint_modules


class PooledFusion(nn.Module):
    """``MultiheadAttention(dim, heads, batch_first=True)`` over [image, text]; first position."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)

    def forward(self, image_vector: torch.Tensor, text_vector: torch.Tensor) -> torch.Tensor:
        features = torch.stack([image_vector, text_vector], dim=1)  # (B, 2, D)
        attended, _ = self.cross_attention(features, features, features)
        return attended[:, 0]


class Attention(nn.Module):
    """Multi-head attention on PyTorch's fused SDPA kernel, with a key padding mask."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        context_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context_index`` (B,): row b attends to context row ``context_index[b]`` (keys and
        values are computed once per context row however many rows share it)."""
        batch, length, dim = x.shape
        q = self.q(x).view(batch, length, self.heads, -1).transpose(1, 2)
        kv = self.kv(context)
        if context_index is not None:
            kv = kv.index_select(0, context_index)
            if context_mask is not None:
                context_mask = context_mask.index_select(0, context_index)
        k, v = kv.view(batch, context.shape[1], 2, self.heads, -1).unbind(dim=2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        attn_mask = None
        if context_mask is not None:
            attn_mask = context_mask.bool()[:, None, None, :]  # True = attend
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class FusionLayer(nn.Module):
    """Pre-norm: self-attention over text, cross-attention to image tokens, feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_image = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        image: torch.Tensor,
        image_mask: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm_self(text)
        text = text + self.self_attn(h, h, text_mask)
        image = self.norm_image(image)
        text = text + self.cross_attn(self.norm_cross(text), image, image_mask, image_index)
        return text + self.mlp(self.norm_mlp(text))

    def first_token(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        image: torch.Tensor,
        image_mask: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` at the first text token only, (P, 1, D): it still attends to every
        token, but only its own query, attention output and feed-forward are computed.
        ``text_index`` (P,): row p reads caption row ``text_index[p]`` (its keys and values are
        computed once per caption, however many rows share it); ``image_index`` likewise."""
        h = self.norm_self(text)
        first, query = text[:, :1], h[:, :1]
        if text_index is not None:
            first, query = first.index_select(0, text_index), query.index_select(0, text_index)
        first = first + self.self_attn(query, h, text_mask, text_index)
        image = self.norm_image(image)
        first = first + self.cross_attn(self.norm_cross(first), image, image_mask, image_index)
        return first + self.mlp(self.norm_mlp(first))


def check_grid_width(dim: int) -> None:
    """:func:`grid_position_code` splits the width in four (sin and cos of row and column)."""
    if dim % 4:
        raise ConfigError(f"fusion.grid_positions needs a width divisible by 4; got {dim}")


def grid_position_code(tokens: int, dim: int) -> torch.Tensor:
    """(tokens, dim) fixed 2-D sine-cosine code of the tokens of a square grid, row by row (as a
    convolutional map or a ViT's patches flatten): a quarter of the channels are sin and cos of
    the row at geometric frequencies, a quarter those of the column. ``tokens = n^2 + 1``: the
    first token is a class token, which gets zeros. Raises :class:`ConfigError` for other counts."""
    side = math.isqrt(tokens)
    leading = 0 if side * side == tokens else 1
    side = math.isqrt(tokens - leading)
    if side * side != tokens - leading or side == 0:
        raise ConfigError(
            f"fusion.grid_positions needs a square grid of image tokens (n^2, or n^2 + 1 with a "
            f"class token); the image tower gives {tokens}"
        )
    check_grid_width(dim)
    quarter = dim // 4
    frequency = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row, column = torch.meshgrid(
        torch.arange(side, dtype=torch.float64),
        torch.arange(side, dtype=torch.float64),
        indexing="ij",
    )
    angles = [axis.reshape(-1, 1) * frequency for axis in (row, column)]
    code = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return F.pad(code, (0, 0, leading, 0)).float()


class CrossAttentionFusion(nn.Module):
    """Text tokens attend to image tokens over ``layers`` layers; output at the first text token."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        dim: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        grid_positions: bool = False,
    ):
        super().__init__()
        if grid_positions:
            check_grid_width(dim)
        self.grid_positions = grid_positions
        self.image_in = nn.Linear(image_dim, dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(
            FusionLayer(dim, heads, mlp_ratio, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        checkpoint_modules(self.layers, enabled)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused vector of each pair (image row b, text row b); with ``image_index`` (P,) and
        ``text_index`` (P,), of each pair (image row ``image_index[p]``, text row
        ``text_index[p]``): each image's tokens are then projected once, and each caption's
        tokens once up to the first layer that reads the image (the same result, far less work
        for ITM negatives and re-ranking).

        The last layer runs for the first text token only, the one returned: the same values
        and gradients as running it for every token, at a fraction of the work."""
        image = self.image_in(image_tokens)
        if self.grid_positions:  # a (T, dim) table of sines: cheap, not worth caching
            code = grid_position_code(image.shape[1], image.shape[2])
            image = image + code.to(device=image.device, dtype=image.dtype)
        text = self.text_in(text_tokens)
        for layer in self.layers[:-1]:
            if text_index is not None:  # from here on a caption's tokens depend on the image
                text = text.index_select(0, text_index)
                if text_mask is not None:
                    text_mask = text_mask.index_select(0, text_index)
                text_index = None
            text = layer(text, text_mask, image, image_mask, image_index)
        last = self.layers[-1].first_token(
            text, text_mask, image, image_mask, image_index, text_index
        )
        return self.norm(last[:, 0])
