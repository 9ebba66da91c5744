"""RMT: Retentive Networks Meet Vision Transformers (Fan et al., CVPR 2024, arXiv 2309.11523).

A conv stem, four stages of RMT blocks (CPE, MaSA with Manhattan spatial decay, FFN) joined by
strided-conv downsampling, and a head that projects every token to 1024 channels, normalises,
applies Swish, pools and classifies. Stages 1-3 (1-2 in RMT-T) use MaSA decomposed along rows
and columns; the last stage(s) attend over all tokens.

Features are channels-last (B, H, W, C) from the stem to the classifier, so ``forward_features``
returns NHWC (``output_fmt``, as timm's MambaOut); ``forward_intermediates`` and ``features_only``
give NCHW stage outputs. Token-labeling models (``token_label=True``, the ``*.in1k_tl`` tags) fuse
their aux head into the logits; trained with token labels (:meth:`RMT.set_token_label_training`)
they return what the token-labeling loss needs instead. Checkpoint files are read and mapped in
:mod:`rmt.checkpoint`. Released checkpoints load through timm::

    model = timm.create_model('rmt_s', pretrained=True, pretrained_cfg_overlay=dict(file='RMT-S.pth'))
"""
import os
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    SelectAdaptivePool2d, calculate_drop_path_rates, get_device_dtype, trunc_normal_,
    use_fused_attn)
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model, resolve_pretrained_cfg)
from timm.models import checkpoint as grad_checkpoint

from .attention import ATTN_IMPLS, MaSA
from .blocks import RMTStage, Stem
from .checkpoint import (
    checkpoint_filter_fn, load_checkpoint, load_checkpoint_file, loading, pretrained_source, read_model_metadata,
    released_names_hook)
from .features import RMTFeatures
from .mixtoken import TokenLabelOutput, mix_tokens, sample_mixtoken_box, unmix_tokens
from .timm_compat import BatchNorm, feature_take_indices, route_load_checkpoint

__all__ = ['RMT', 'RMTHead', 'MODEL_ARGS']


def check_input(x: torch.Tensor, in_chans: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point image batch (B, in_chans, H, W)."""
    if x.dim() != 4 or (not torch.jit.is_tracing() and x.shape[1] != in_chans):  # traced: no Python bool
        raise ValueError('RMT expects input of shape (B, {}, H, W), got {}'.format(in_chans, list(x.shape)))
    if not x.is_floating_point():
        raise ValueError('RMT expects floating-point images, normalised with the pretrained_cfg mean and std, '
                         'got {}: convert with x.float() / 255 and normalise'.format(x.dtype))


torch.fx.wrap('check_input')  # FX graphs check their input when they run


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


@contextmanager
def _frozen_batchnorm_stats(module: nn.Module):
    """BatchNorm layers in ``module`` normalise as usual but leave their running stats alone.

    For the recomputation in gradient checkpointing: the forward pass already updated them once.
    """
    norms = [m for m in module.modules() if isinstance(m, BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _checkpointed_stem(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return grad_checkpoint(stem, x, context_fn=lambda: (nullcontext(), _frozen_batchnorm_stats(stem)))


class RMTHead(nn.Module):
    """Per-token projection to ``hidden_size``, BatchNorm, Swish, global pool, dropout, classifier.

    Works on the last stage's (B, H, W, C) tokens. The BatchNorm normalises each channel over
    (B, H, W), as the released BatchNorm2d on the NCHW map does. ``pre_logits`` returns the pooled
    ``hidden_size`` features (the unpooled (B, H, W, hidden_size) map when the pool is disabled).
    """

    def __init__(self, in_features: int, hidden_size: int, num_classes: int, pool_type: str = 'avg',
                 drop_rate: float = 0., device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.proj = nn.Linear(in_features, hidden_size, **dd)
        self.norm = nn.BatchNorm1d(hidden_size, **dd)
        self.act = nn.SiLU()
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type), input_fmt='NHWC')
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False,
              in_features: Optional[int] = None, device=None, dtype=None) -> None:
        """New classifier (and pool); ``reset_other`` also removes the projection, norm and Swish, so the
        head takes ``in_features`` wide tokens as they are (what a pruned model needs)."""
        dd = get_device_dtype(self, device=device, dtype=dtype)
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type), input_fmt='NHWC')
        if reset_other:
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.hidden_size = self.in_features
        if in_features is not None and in_features != self.in_features:
            if not isinstance(self.proj, nn.Identity):
                raise ValueError('the head\'s input width changes only with its projection removed (reset_other=True)')
            self.in_features = self.hidden_size = in_features
        self.fc = nn.Linear(self.hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def is_pooled(self) -> bool:
        return not self.global_pool.is_identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.proj(x)
        x = self.act(self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape))
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


class RMT(nn.Module):
    """RMT backbone and classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling of the head ('avg', 'max', ... or '' for none).
        embed_dims, depths, num_heads: per-stage width, block count and MaSA heads.
        decay_exponents, heads_ranges: per-stage decay settings: head h of n decays by
            ``gamma_h = 1 - 2 ** -(decay_exponent + heads_range * h / n)`` per token of distance
            (the released code's ``init_values`` and ``heads_ranges``; see :func:`rmt.position.decay_rates`).
        mlp_ratios: per-stage FFN expansion.
        decomposed: per-stage flag, MaSA decomposed along rows and columns (else full attention).
        layer_scales: per-stage flag for LayerScale, initialised to ``layer_init_values``.
        projection: width of the head's per-token projection.
        token_label: add the token-labeling aux head; logits become ``cls + 0.5 * max_tokens(aux)``
            (see :meth:`set_token_label_training` for training with token labels).
        feature_norm: add a LayerNorm per stage output, applied to every intermediate (stage feature)
            taken, as the paper's detection and segmentation backbones do.
        drop_rate, drop_path_rate: classifier dropout, stochastic depth (linear over blocks).
        attn_impl: attention path, one of ``rmt.ATTN_IMPLS`` ('auto' picks by device and size, or
            'reference' when timm's ``use_fused_attn()`` is off, as under ``exportable=True``; the
            ``RMT_ATTN_IMPL`` environment variable overrides 'auto', see :meth:`set_attn_impl`).
        grad_checkpointing, frozen_stages, norm_eval: training controls, as :meth:`set_grad_checkpointing`
            and :meth:`set_frozen_stages` set them (here for configs that can only pass arguments, such as
            mmdet's through mmpretrain's ``TIMMBackbone``).
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            num_heads: Sequence[int] = (4, 4, 8, 16),
            decay_exponents: Sequence[float] = (2, 2, 2, 2),
            heads_ranges: Sequence[float] = (4, 4, 6, 6),
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            decomposed: Sequence[bool] = (True, True, False, False),
            layer_scales: Sequence[bool] = (False, False, False, False),
            layer_init_values: float = 1e-6,
            projection: int = 1024,
            token_label: bool = False,
            feature_norm: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            attn_impl: str = 'auto',
            grad_checkpointing: bool = False,
            frozen_stages: int = -1,
            norm_eval: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        for name, value in (('embed_dims', embed_dims), ('num_heads', num_heads), ('decay_exponents', decay_exponents),
                            ('heads_ranges', heads_ranges), ('mlp_ratios', mlp_ratios),
                            ('decomposed', decomposed), ('layer_scales', layer_scales)):
            if len(value) != num_stages:
                raise ValueError(f'{name} has {len(value)} entries, depths has {num_stages}')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.token_label = token_label and num_classes > 0
        self.token_label_training = False
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.frozen_stages = -1
        self.norm_eval = False
        # state-dict prefixes of what prune_intermediate_layers removed: a checkpoint's tensors for them are ignored
        self.pruned_prefixes = ()
        self.output_fmt = 'NHWC'
        self.num_features = embed_dims[-1]
        self.head_hidden_size = projection
        self.feature_info: List[Dict[str, Any]] = []

        with torch.device(device) if device is not None else nullcontext():
            self.stem = Stem(in_chans, embed_dims[0])
            dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
            stages = []
            for i in range(num_stages):
                stages.append(RMTStage(
                    in_dim=embed_dims[i - 1] if i > 0 else embed_dims[0],
                    dim=embed_dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    decay_exponent=decay_exponents[i],
                    heads_range=heads_ranges[i],
                    mlp_ratio=mlp_ratios[i],
                    decomposed=decomposed[i],
                    layer_scale_init=layer_init_values if layer_scales[i] else None,
                    drop_path=dpr[i],
                    downsample=i > 0,
                ))
                self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
            self.stages = nn.Sequential(*stages)
            # eps 1e-5 (nn.LayerNorm's default), as the released detection/segmentation backbones' extra_norms
            self.feature_norms = nn.ModuleList([nn.LayerNorm(d) for d in embed_dims]) \
                if feature_norm else None
            self.head = RMTHead(self.num_features, projection, num_classes, global_pool, drop_rate)
            self.aux_head = nn.Linear(self.num_features, num_classes) if self.token_label else nn.Identity()
            self.apply(self._init_weights)
        if dtype is not None:
            self.to(dtype)
        if attn_impl == 'auto' and not use_fused_attn():
            attn_impl = 'reference'  # timm's convention, e.g. under exportable=True: explicit matmuls
        self.set_attn_impl(attn_impl)
        self.set_grad_checkpointing(grad_checkpointing)
        self.set_frozen_stages(frozen_stages, norm_eval)
        # released checkpoints load through every path: load_state_dict, timm's load_checkpoint, checkpoint_path=
        self.register_load_state_dict_pre_hook(released_names_hook)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_attn_impl(self, impl: str = 'auto') -> None:
        """Choose the attention path of every stage: one of ``rmt.ATTN_IMPLS`` (see :mod:`rmt.attention`).

        'auto' takes the ``RMT_ATTN_IMPL`` environment variable when it is set, so a path can be forced
        without code changes (``RMT_ATTN_IMPL=sdpa python scripts/train.py ...``). Raises ``ValueError``
        for an unknown path, naming where it came from.
        """
        source = 'attention implementation'
        if impl == 'auto' and os.environ.get('RMT_ATTN_IMPL'):
            impl, source = os.environ['RMT_ATTN_IMPL'], 'RMT_ATTN_IMPL'
        if impl not in ATTN_IMPLS:
            raise ValueError(f'unknown {source} {impl!r}, expected one of {ATTN_IMPLS}')
        for module in self.modules():
            if isinstance(module, MaSA):
                module.attn_impl = impl

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_frozen_stages(self, frozen_stages: int = -1, norm_eval: bool = False) -> None:
        """Freeze the stem and the first stages, as mmdet's ``frozen_stages`` and ``norm_eval`` do.

        ``frozen_stages``: -1 freezes nothing, 0 the stem, k the stem and stages 1..k (with their
        downsampling). Frozen parts get no gradients and stay in eval mode under ``train()`` (their
        BatchNorm statistics fixed, no drop path). ``norm_eval`` keeps every BatchNorm in eval mode in
        training too. Calling again with other values undoes the previous freezing.
        """
        if not -1 <= frozen_stages <= len(self.stages):
            raise ValueError(f'frozen_stages must be -1 (none), 0 (the stem) or up to {len(self.stages)}, '
                             f'got {frozen_stages}')
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        frozen = self._frozen_modules()
        for module in [self.stem, *self.stages]:
            module.requires_grad_(module not in frozen)
        self.train(self.training)

    def _frozen_modules(self) -> List[nn.Module]:
        return [self.stem, *self.stages[:self.frozen_stages]] if self.frozen_stages >= 0 else []

    def train(self, mode: bool = True) -> 'RMT':
        """``nn.Module.train``, keeping frozen stages (and with ``norm_eval`` every BatchNorm) in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, BatchNorm):
                        module.eval()
        return self

    @torch.jit.ignore
    def set_token_label_training(self, enable: bool = True) -> None:
        """Train with token labels: in training mode ``forward`` then returns a
        :class:`~rmt.mixtoken.TokenLabelOutput` (class logits, per-token aux logits, MixToken box).

        Each training forward applies MixToken after the stem, as the released token-labeling
        models do. Evaluation mode, ``forward_features``, ``forward_head``, ``features_only`` and
        TorchScript are unaffected. Needs the aux head (``token_label=True``) and a pooling head.
        """
        if enable and not (self.token_label and self.head.is_pooled()):
            raise ValueError('token-label training needs a token-labeling model (token_label=True, the *_tl tags) '
                             'with classes and a pooling head')
        self.token_label_training = enable

    @torch.jit.ignore
    def output_grid(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """The last stage's token grid (h, w) for an input of ``img_size`` (H, W): the aux logits' and the
        dense targets' grid. Every stride-2 conv (padding 1) rounds up, so each side is ceil(size / stride)."""
        stride = 4 * 2 ** (len(self.stages) - 1)
        return -(-int(img_size[0]) // stride), -(-int(img_size[1]) // stride)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """New classifier(s) for ``num_classes`` (0: none); ``reset_other`` also removes the head's projection."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features, **dd)
        self.head_hidden_size = self.head.hidden_size
        if self.token_label:
            self.token_label = num_classes > 0
            self.aux_head = nn.Linear(self.num_features, num_classes, **dd) if self.token_label else nn.Identity()
            self.aux_head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before the next stage's downsampling) and the final (B, H, W, C) features.

        Args:
            x: input images (B, in_chans, H, W).
            indices: take the last n stages if int, all if None, these stages if a sequence.
            norm: unused; intermediates are normalised exactly when the model has ``feature_norm``.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC', got {!r}".format(output_fmt))
        check_input(x, self.in_chans)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.forward_stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = x
                if self.feature_norms is not None:
                    y = self.feature_norms[i](y)
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices``, the output norms of stages not in ``indices``, and
        the head when asked or when stages go, so every parameter left is used by
        ``forward_intermediates(indices=indices)``. A checkpoint's tensors for the removed parts are ignored
        on load."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        pruned = [f'stages.{i}.' for i in range(max_index + 1, len(self.stages))]
        self.stages = self.stages[:max_index + 1]
        if self.feature_norms is not None:
            pruned += [f'feature_norms.{i}.' for i in range(len(self.feature_norms)) if i not in take_indices]
            kept = self.feature_norms[:max_index + 1]
            self.feature_norms = nn.ModuleList([n if i in take_indices else nn.Identity() for i, n in enumerate(kept)])
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            pruned += ['head.', 'aux_head.']
            self.token_label = self.token_label_training = False
            self.aux_head = nn.Identity()
            self.reset_classifier(0, '', reset_other=True)
        self.pruned_prefixes = tuple(dict.fromkeys(self.pruned_prefixes + tuple(pruned)))
        return take_indices

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stem, to channels-last (B, H/4, W/4, C). It runs channels-last, so its convs use the
        faster kernels and the stages get contiguous features. Checkpointed with the blocks: at detection
        sizes its full-resolution activations are a large share of training memory. Exported graphs keep
        the input's layout: a layout is not part of them, and the channels-last convs of a batch traced
        as 1 would make torch.export assume a batch of 1."""
        if torch.jit.is_scripting() or not _exporting():
            x = x.contiguous(memory_format=torch.channels_last)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = _checkpointed_stem(self.stem, x)
        else:
            x = self.stem(x)
        return x.permute(0, 2, 3, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's features (B, H/32, W/32, C), unpooled."""
        check_input(x, self.in_chans)
        x = self.forward_stem(x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = self.head(x, pre_logits=pre_logits)
        if pre_logits or not self.token_label or not self.head.is_pooled():
            return out
        aux = self.aux_head(x.flatten(1, 2))
        return out + 0.5 * aux.max(dim=1)[0]

    @torch.jit.unused
    def forward_token_label(self, x: torch.Tensor) -> TokenLabelOutput:
        """A token-labeling training step's outputs: MixToken on the stem's tokens, then class logits
        (B, num_classes) and per-token aux logits (B, h, w, num_classes) with the box's tokens un-mixed."""
        check_input(x, self.in_chans)
        box = sample_mixtoken_box(self.output_grid(x.shape[-2:]))
        x = self.forward_stem(x)
        scale = 2 ** (len(self.stages) - 1)  # stem tokens per last-stage token, along each side
        x = self.stages(mix_tokens(x, box, scale))
        return TokenLabelOutput(self.head(x), unmix_tokens(self.aux_head(x), box), box)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.token_label_training and self.training:
            return self.forward_token_label(x)
        return self.forward_head(self.forward_features(x))

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also taking released and downstream files in their own names (mapped
        by :func:`rmt.checkpoint.released_names_hook`, which is told ``strict``: torch does not tell hooks)."""
        with loading(strict=strict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, use_ema: bool = False) -> None:
        """Load a released or project checkpoint file into this model (timm's ``custom_load`` hook)."""
        state = load_checkpoint_file(checkpoint_path)
        try:
            state_dict = checkpoint_filter_fn(state, self, use_ema=use_ema, source=str(checkpoint_path))
        except ValueError as e:
            made_for = read_model_metadata(checkpoint_path)
            if made_for is None:
                raise
            name, kwargs = made_for
            raise type(e)(f'{e} | {checkpoint_path} was converted for {name} with {kwargs}: create the model '
                          f'with those arguments') from None
        self.load_state_dict(state_dict, strict=True)


# --- variants and registration ----------------------------------------------------------------------

def _create_rmt(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    if pretrained:
        # every source timm resolves (file, url, state_dict, local-dir:, hf-hub:) loads with our loader
        source = pretrained_source(cfg, overlay.get('custom_load', True), kwargs.get('cache_dir'))
        if source is None:
            raise RuntimeError(
                f'{variant}: the released RMT weights are not hosted; pass the downloaded file, e.g. '
                f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='RMT-S.pth')), "
                f"or a published folder: 'local-dir:DIR' or 'hf-hub:org/name'")
        overlay.update(source)
    if (cfg.tag or '').endswith('_tl'):  # the *_tl tags, and folders published from token-labeling files
        kwargs.setdefault('token_label', True)
    model = build_model_with_cfg(
        RMT, variant, False,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls=RMTFeatures),
        **kwargs,
    )
    if pretrained:
        # Loaded here, after timm's features_only wrapper has pruned the model, so a backbone file (no head, only
        # some stages' norms used) fits exactly what the backbone keeps. checkpoint_filter_fn adapts the classifier
        # and the stem by their shapes, so timm is told the source's class and channel counts: it changes nothing.
        rmt_model = model.model if kwargs.get('features_only') else model
        cfg = rmt_model.pretrained_cfg
        load_pretrained(rmt_model, cfg, num_classes=cfg.get('num_classes', rmt_model.num_classes),
                        in_chans=cfg.get('input_size', (rmt_model.in_chans,))[0], filter_fn=checkpoint_filter_fn,
                        cache_dir=kwargs.get('cache_dir'))
    return model


def _cfg(token_label: bool = False, **kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': ('head.fc', 'aux_head') if token_label else 'head.fc',
        'paper_ids': 'arXiv:2309.11523',
        'paper_name': 'RMT: Retentive Networks Meet Vision Transformers',
        'origin_url': 'https://github.com/qhfan/RMT',
        'notes': ('released weights are not hosted; pass the file (pretrained_cfg_overlay=dict(file=...)) or load '
                  'a published folder (local-dir:DIR, hf-hub:org/name)',),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'rmt_t.in1k': _cfg(),
    'rmt_s.in1k': _cfg(),
    'rmt_s.in1k_tl': _cfg(token_label=True),
    'rmt_b.in1k': _cfg(),
    'rmt_b.in1k_tl': _cfg(token_label=True),
    'rmt_l.in1k': _cfg(),
    'rmt_l.in1k_tl': _cfg(token_label=True),
})

# The released configurations (as in the authors' code); drop path rates are training recipe values (configs/).
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    'rmt_t': dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), heads_ranges=(4, 4, 6, 6),
        mlp_ratios=(3, 3, 3, 3), decomposed=(True, True, False, False), layer_scales=(False,) * 4),
    'rmt_s': dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16), heads_ranges=(4, 4, 6, 6),
        mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False), layer_scales=(False,) * 4),
    'rmt_b': dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16), heads_ranges=(5, 5, 6, 6),
        mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False), layer_scales=(False, False, True, True)),
    'rmt_l': dict(
        embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20), heads_ranges=(6, 6, 6, 6),
        mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False), layer_scales=(False, False, True, True)),
}


@register_model
def rmt_t(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-T: 14.3M params, 82.4% ImageNet-1k top-1 (paper)."""
    return _create_rmt('rmt_t', pretrained, **dict(MODEL_ARGS['rmt_t'], **kwargs))


@register_model
def rmt_s(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S: 27.0M params, 84.1% ImageNet-1k top-1 (paper), 84.8% with token labeling."""
    return _create_rmt('rmt_s', pretrained, **dict(MODEL_ARGS['rmt_s'], **kwargs))


@register_model
def rmt_b(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B: 54.2M params, 85.0% ImageNet-1k top-1 (paper), 85.6% with token labeling."""
    return _create_rmt('rmt_b', pretrained, **dict(MODEL_ARGS['rmt_b'], **kwargs))


@register_model
def rmt_l(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L: 95.5M params, 85.5% ImageNet-1k top-1 (paper), 86.1% with token labeling."""
    return _create_rmt('rmt_l', pretrained, **dict(MODEL_ARGS['rmt_l'], **kwargs))


def _loads_with_rmt(model: nn.Module) -> bool:
    """An RMT model, or timm's ``features_only`` wrapper of one: what timm's ``load_checkpoint`` sends to ours."""
    return isinstance(model, RMT) or isinstance(getattr(model, 'model', None), RMT)


# timm's load_checkpoint (and create_model(checkpoint_path=...)) reads RMT checkpoints with rmt's loader
route_load_checkpoint(_loads_with_rmt, load_checkpoint)
