"""RMT building blocks: conv stem, downsampling, CPE, FFN, the RMT block and a stage of blocks.

Stages work on channels-last (B, H, W, C) features so the Linear layers see contiguous channels;
the depthwise convs view the same memory as channels-last NCHW, so no layout copies are needed.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, LayerScale, fast_layer_norm
from timm.models import checkpoint as grad_checkpoint

from .attention import AttentionPlan, MaSA2d, plan_masa
from .attention.layers import channels_first
from .attention.backends import autocast_dtype
from .position import PositionTables, RelPos

__all__ = ['Stem', 'Downsample', 'ResidualDWConv', 'fold_residual_kernels', 'CPE', 'GeluDWConv', 'gelu_dwconv', 'FFN', 'AutocastLayerNorm',
           'RMTBlock', 'RMTStage']


class Stem(nn.Module):
    """Four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm and GELU: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        mid = out_chans // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=1, padding=1)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chans, 3, stride=2, padding=1)
        self.norm3 = nn.BatchNorm2d(out_chans)
        self.conv4 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1)
        self.norm4 = nn.BatchNorm2d(out_chans)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.act(self.norm3(self.conv3(x)))
        return self.norm4(self.conv4(x))


class Downsample(nn.Module):
    """3x3 conv with stride 2 and BatchNorm between stages, on channels-last features."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(channels_first(x))).permute(0, 2, 3, 1)


class _GeluDWConvFunction(torch.autograd.Function):
    """``conv(GELU(x))`` that keeps only ``x`` for backward and recomputes the GELU there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(F.gelu(x), weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        pad, groups = ctx.padding, weight.shape[0]
        grad_h, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, F.gelu(x), weight, [groups] if ctx.has_bias else None, [1, 1], [pad, pad], [1, 1], False, [0, 0],
            groups, [True, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return torch.ops.aten.gelu_backward(grad_h, x), grad_weight, grad_bias, None


def gelu_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """Depthwise ``conv(GELU(x))`` of (B, C, H, W) ``x``. Under autograd only ``x`` is kept for backward,
    not also ``GELU(x)``: the FFN's hidden activations are the largest tensors a block saves. Traced
    graphs (``torch.jit.trace``, ONNX) and TorchScript take the plain ops."""
    if torch.jit.is_scripting() or not torch.is_grad_enabled() or _tracing():
        return F.conv2d(F.gelu(x), weight, bias, padding=padding, groups=weight.shape[0])
    return _gelu_dwconv_keeping_input(x, weight, bias, padding)


@torch.jit.unused
def _tracing() -> bool:
    return torch.jit.is_tracing()


@torch.jit.unused
def _gelu_dwconv_keeping_input(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               padding: int) -> torch.Tensor:
    # cast as autocast would, so that backward sees the dtypes forward used
    return _GeluDWConvFunction.apply(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding)


torch.fx.wrap('gelu_dwconv')  # a leaf of FX graphs: the autograd function runs, untraced


class ResidualDWConv(nn.Module):
    """``x + DWConv(x)`` (depthwise, with bias) on channels-last (B, H, W, C) features, as one conv.

    The residual is folded into the kernel (its centre raised by 1): the same sum, without a
    separate pass over memory for the add. Exported and traced graphs take the kernel :meth:`fold`
    stored (``rmt.export`` folds before exporting): a constant, where ``weight + identity`` would be a
    graph value that runtimes such as ExecuTorch's XNNPACK cannot take as a conv weight.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        identity = torch.zeros(dim, 1, kernel_size, kernel_size)
        identity[:, :, kernel_size // 2, kernel_size // 2] = 1
        self.register_buffer('identity', identity, persistent=False)
        self.register_buffer('folded_kernel', torch.empty(0), persistent=False)

    @torch.no_grad()
    def fold(self) -> None:
        """Store ``weight + identity`` for graph capture (refreshed by every ``rmt.export`` call)."""
        self.folded_kernel = self.conv.weight + self.identity

    def kernel(self) -> torch.Tensor:
        """The depthwise kernel with the residual folded in, (C, 1, k, k)."""
        if not torch.jit.is_scripting() and self.folded_kernel.numel() > 0 and _graph_capture():
            return self.folded_kernel
        return self.conv.weight + self.identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(channels_first(x), self.kernel(), self.conv.bias, padding=self.conv.padding,
                     groups=self.conv.groups)
        return x.permute(0, 2, 3, 1)


@torch.jit.unused
def _graph_capture() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def fold_residual_kernels(model: nn.Module) -> None:
    """:meth:`ResidualDWConv.fold` every CPE and FFN conv of ``model``: what exported graphs take as weights."""
    for module in model.modules():
        if isinstance(module, ResidualDWConv):
            module.fold()


class CPE(ResidualDWConv):
    """Conditional positional encoding, ``x + DWConv3x3(x)``, at the start of every block (the released ``pos``)."""

    def __init__(self, dim: int):
        super().__init__(dim, 3)


class GeluDWConv(ResidualDWConv):
    """The FFN's activation and conv: ``h + DWConv3x3(h)`` with ``h = GELU(x)``, computed by :func:`gelu_dwconv`
    so that backward keeps ``x`` only."""

    def __init__(self, dim: int):
        super().__init__(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gelu_dwconv(channels_first(x), self.kernel(), self.conv.bias, self.conv.padding[0])
        return x.permute(0, 2, 3, 1)


class FFN(nn.Module):
    """fc1, GELU, a residual depthwise 3x3 conv on the hidden width, fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = GeluDWConv(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dwconv(self.fc1(x)))


class AutocastLayerNorm(nn.LayerNorm):
    """LayerNorm over channels that keeps autocast's dtype.

    Under autocast, PyTorch runs LayerNorm in float32: it copies its half-precision input up and the
    next Linear copies the output back down, and the float32 copy is what backward keeps. timm's
    ``fast_layer_norm`` reads and writes the autocast dtype and accumulates in float32 inside the kernel.
    Outside autocast it is ``nn.LayerNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return autocast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def autocast_layer_norm(x: torch.Tensor, normalized_shape: List[int], weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``F.layer_norm``, in autocast's dtype under autocast (see :class:`AutocastLayerNorm`)."""
    if not torch.jit.is_scripting() and autocast_dtype(x) is not None:
        return fast_layer_norm(x, normalized_shape, weight, bias, eps)
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


torch.fx.wrap('autocast_layer_norm')


class RMTBlock(nn.Module):
    """CPE, then MaSA and FFN, each pre-norm with optional LayerScale and DropPath."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float,
            decomposed: bool,
            layer_scale_init: Optional[float] = None,
            drop_path: float = 0.,
            decay_exponent: float = 2.,
            heads_range: float = 4.,
    ):
        super().__init__()
        self.cpe = CPE(dim)
        self.norm1 = AutocastLayerNorm(dim, eps=1e-6)
        self.attn = MaSA2d(dim, num_heads, decomposed, decay_exponent=decay_exponent, heads_range=heads_range)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = AutocastLayerNorm(dim, eps=1e-6)
        self.ffn = FFN(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, plan: AttentionPlan, tables: PositionTables) -> torch.Tensor:
        x = self.cpe(x)
        x = x + self.drop_path1(self.ls1(self.attn.attend(self.norm1(x), plan, tables)))
        x = x + self.drop_path2(self.ls2(self.ffn(self.norm2(x))))
        return x


torch.fx.wrap('plan_masa')  # FX graphs (torchvision's feature extraction) plan at run time


class RMTStage(nn.Module):
    """Optional downsampling from the previous stage, then ``depth`` RMT blocks sharing one attention plan and
    one set of position tables (their MaSA layers are configured alike; the first one's ``relpos`` builds them)."""
    # Python-side conveniences; TorchScript would pin their return types to the first scripted model's classes
    __jit_unused_properties__ = ['relpos', 'attn_impl']

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            decay_exponent: float,
            heads_range: float,
            mlp_ratio: float,
            decomposed: bool,
            layer_scale_init: Optional[float] = None,
            drop_path: Optional[List[float]] = None,
            downsample: bool = True,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f'a stage needs at least one block, got depth {depth}')
        self.decomposed = decomposed
        self.num_heads = num_heads
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        drop_path = drop_path or [0.] * depth
        self.blocks = nn.ModuleList([
            RMTBlock(dim, num_heads, mlp_ratio, decomposed, layer_scale_init, drop_path[i], decay_exponent,
                     heads_range)
            for i in range(depth)
        ])

    @property
    def relpos(self) -> RelPos:
        """The position tables' builder of the stage (its first MaSA layer's)."""
        return self.blocks[0].attn.relpos

    @property
    def attn_impl(self) -> str:
        return self.blocks[0].attn.attn_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        attn = self.blocks[0].attn
        plan = plan_masa(attn.attn_impl, x, [x.shape[1], x.shape[2]], self.num_heads, self.decomposed)
        tables = attn.relpos([x.shape[1], x.shape[2]], x.device, plan.table_dtype, plan.needs_full_bias)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = grad_checkpoint(block, x, plan, tables)
            else:
                x = block(x, plan, tables)
        return x
