"""R4BForConditionalGeneration: SigLIP vision tower -> AnyRes packing (unpad, downsample, image_newline per row)
-> projector (LayerNorm -> Linear -> GELU -> Linear) -> features scattered into the ``<image>`` positions of a
packed Qwen3 batch. Parameter names follow R-4B's hub checkpoint (``model.language_model.*``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import R4BConfig
from .image import downsample_size, tile_grid, unpadded_box
from .qwen3 import Qwen3Model, check_packed
from .siglip import SiglipVisionModel


class R4BProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, *, pre_norm: bool = True) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(in_dim, eps=1e-6) if pre_norm else None
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return self.linear_2(F.gelu(self.linear_1(x)))


class R4BModel(nn.Module):
    def __init__(self, cfg: R4BConfig) -> None:
        super().__init__()
        v, t = cfg.vision_config, cfg.text_config
        self.vision_tower = SiglipVisionModel(v, post_layernorm=False)
        in_dim = v.hidden_size * len(cfg.feature_layers)
        self.multi_modal_projector = R4BProjector(in_dim, t.hidden_size, pre_norm=cfg.projector_pre_norm)
        self.image_newline = nn.Parameter(torch.zeros(t.hidden_size))
        self.language_model = Qwen3Model(t)


class R4BForConditionalGeneration(nn.Module):
    def __init__(self, cfg: R4BConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = R4BModel(cfg)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each decoder and vision encoder layer's forward in the backward instead of keeping its
        activations (see Qwen3Model); ``False`` turns it off."""
        self.model.language_model.gradient_checkpointing = bool(enabled)
        self.model.vision_tower.gradient_checkpointing = bool(enabled)

    @property
    def language_model(self) -> Qwen3Model:
        """The decoder stack (same attribute on Qwen3ForCausalLM, for the runtime)."""
        return self.model.language_model

    def _split_pixels(self, pixel_values: Tensor | list[Tensor], image_sizes: list) -> list[Tensor]:
        cfg = self.config
        tile = cfg.vision_config.image_size
        grids = [tile_grid(int(h), int(w), cfg.image_grid_pinpoints, tile) for h, w in image_sizes]
        counts = [1 + r * c for r, c in grids]
        if isinstance(pixel_values, Tensor):
            if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
                raise ValueError(f"pixel_values must be ({sum(counts)}, 3, {tile}, {tile}) for image_sizes="
                                 f"{image_sizes} (tiles per image {counts}), got {tuple(pixel_values.shape)}")
            return list(pixel_values.split(counts))
        if len(pixel_values) != len(image_sizes):
            raise ValueError(f"got {len(pixel_values)} pixel_values but {len(image_sizes)} image_sizes")
        for i, (p, n) in enumerate(zip(pixel_values, counts, strict=True)):
            if p.dim() != 4 or p.shape[0] != n:
                raise ValueError(f"pixel_values[{i}] must hold {n} tiles (base + grid) for image size "
                                 f"{tuple(image_sizes[i])}, got shape {tuple(p.shape)}")
        return list(pixel_values)

    def _pack(self, feats: Tensor, height: int, width: int) -> Tensor:
        """Projected features of one image (1 + rows*cols, P, H) -> (num_image_tokens, H)."""
        cfg = self.config
        g = cfg.vision_config.grid
        rows, cols = tile_grid(height, width, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        base, tiles = feats[0], feats[1:]
        Hd = tiles.shape[-1]
        fmap = tiles.view(rows, cols, g, g, Hd).permute(4, 0, 2, 1, 3).reshape(Hd, rows * g, cols * g)  # (H, rg, cg)
        top, bottom, left, right = unpadded_box(rows * g, cols * g, height, width)
        fmap = fmap[:, top:bottom, left:right]
        size = downsample_size(fmap.shape[1], fmap.shape[2], g, cfg.max_num_patches)
        if size is not None:
            fmap = F.interpolate(fmap[None], size=size, mode="bilinear")[0]
        newline = self.model.image_newline.to(fmap.dtype)[:, None, None].expand(Hd, fmap.shape[1], 1)
        fmap = torch.cat([fmap, newline], dim=2)  # (H, h, w + 1)
        return torch.cat([base, fmap.flatten(1).transpose(0, 1)], 0)  # (P + h * (w + 1), H)

    def image_features(self, pixel_values: Tensor | list[Tensor], image_sizes: list | Tensor) -> list[Tensor]:
        """Per image, the (num_image_tokens, H_text) features that replace its ``<image>`` tokens.

        pixel_values: one (1 + rows*cols, 3, S, S) tensor per image (as :class:`ImageProcessor` makes), or
        their concatenation; image_sizes: the original (height, width) of each image.
        """
        cfg = self.config
        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [list(s) for s in image_sizes]
        per_image = self._split_pixels(pixel_values, sizes)
        tower = self.model.vision_tower
        hs = tower.hidden_states(torch.cat(per_image, 0), cfg.feature_layers)
        x = torch.cat(hs, dim=-1) if len(hs) > 1 else hs[0]  # (N, P, E * layers)
        x = self.model.multi_modal_projector(x)  # (N, P, H)
        out = []
        for feats, (h, w) in zip(x.split([p.shape[0] for p in per_image]), sizes, strict=True):
            out.append(self._pack(feats, int(h), int(w)))
        return out

    def embed(self, input_ids: Tensor, pixel_values=None, image_sizes=None, vision_keepalive: bool = False) -> Tensor:
        """Token embeddings (T, H) with image features scattered into the ``<image>`` positions.

        vision_keepalive: without images, still run one blank tile through the vision tower and the projector and
        add 0 x their output, so every vision parameter takes part in the forward and backward (data-parallel
        training: under FSDP2 a rank without images would otherwise skip the tower's collectives)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 1 or input_ids.dtype != torch.int64:
            got = (input_ids.dtype, tuple(input_ids.shape)) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be a 1-D int64 tensor (T,), got {got}")
        mask = input_ids == self.config.image_token_index
        n_tok = int(mask.sum())
        x = self.model.language_model.embed_tokens(input_ids.masked_fill(mask, 0))  # (T, H)
        if pixel_values is None:
            if n_tok:
                raise ValueError(f"input_ids hold {n_tok} image tokens but no pixel_values were given")
            if vision_keepalive:
                s = self.config.vision_config.image_size
                blank = x.new_zeros((1, 3, s, s))
                hs = self.model.vision_tower.hidden_states(blank, self.config.feature_layers)
                feats = self.model.multi_modal_projector(torch.cat(hs, dim=-1) if len(hs) > 1 else hs[0])
                x = x + 0.0 * (feats.sum() + self.model.image_newline.sum()).to(x.dtype)
            return x
        if image_sizes is None:
            raise ValueError("image_sizes is required with pixel_values")
        feats = torch.cat(self.image_features(pixel_values, image_sizes), 0)  # (n_tok, H)
        if feats.shape[0] != n_tok:
            raise ValueError(f"input_ids hold {n_tok} image tokens (id {self.config.image_token_index}) but the "
                             f"images give {feats.shape[0]} features")
        return x.masked_scatter(mask[:, None], feats.to(x.dtype))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        pixel_values: Tensor | list[Tensor] | None = None,
        image_sizes: list | Tensor | None = None,
        vision_keepalive: bool = False,
    ) -> Tensor:
        """Packed batch (DESIGN.md) plus the images of all its sequences in order. Returns hidden (T, H).
        vision_keepalive: see :meth:`embed` (the trainers set it when several ranks train)."""
        x = self.embed(input_ids, pixel_values, image_sizes, vision_keepalive)
        check_packed(x.shape[0], position_ids, cu_seqlens, max_seqlen)
        return self.model.language_model(x, position_ids, cu_seqlens, max_seqlen)

    def compute_logits(self, hidden: Tensor, rows: Tensor | list[int] | None = None) -> Tensor:
        """Logits (R, V) for the chosen rows of hidden (T, H) (all rows when ``rows`` is None)."""
        if rows is not None:
            hidden = hidden[rows]
        return self.lm_head(hidden)
