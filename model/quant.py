"""Weight-only quantised linear layers (4- and 8-bit codes, one scale per group of 32) and the ways to fill them.

A 4-bit weight is `q * scale + offset` for a code q in [0, 16), an 8-bit one `q * scale` for q in [-127, 127],
with one scale (and offset) per group of 32 input features. llama.cpp's blocks are exactly this: Q4_0 is
`(q - 8) d` (scale d, offset -8d), Q4_1 is `q d + m` (scale d, offset m), Q8_0 is `q d`. So a GGUF's Q4_0, Q4_1
and Q8_0 tensors are served as they are, and any float weight can be quantised to either form.

Generated tokens are multiplied on the packed codes by our own CPU kernel (model/kernels/packed_linear.c, through
the op `llama3::packed_linear`): the codes are exact in bfloat16, each group's dot product runs on AVX-512 BF16
in float32, and its scale is applied once per group in float32. It computes every row on its own, so a row's
result does not depend on the batch. Prompt tokens come hundreds at a time, where a dense bfloat16 matrix is
faster, so a layer may also keep a dense copy for them (see `PackedLinear.forward`). Without the kernel (no C
compiler, no AVX-512 BF16), every row uses the dense weight.
"""

from __future__ import annotations

import torch
from torch import nn

from model.kernels.cpu import packed_linear_kernel

GROUP_SIZE = 32  # llama.cpp's Q4_0/Q4_1/Q8_0 block
TILE = 16        # output features per tile of the kernel's layout


def packable(out_features: int, in_features: int) -> bool:
    return out_features % TILE == 0 and in_features % GROUP_SIZE == 0


def _packed_linear(x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, bits: int, out_features: int,
                   out_float: bool) -> torch.Tensor:
    kernel = packed_linear_kernel(bits)
    if kernel is None:
        raise RuntimeError("the packed linear kernel is not available on this machine")
    return kernel(x, codes, params, out_features, torch.float32 if out_float else torch.bfloat16)


# A schema-defined op, so that a compiled decode step calls the kernel as one opaque node (see model/attention.py).
_library = torch.library.Library("llama3", "FRAGMENT")
_library.define("packed_linear(Tensor x, Tensor codes, Tensor params, int bits, int out_features, bool out_float)"
                " -> Tensor")
_library.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("llama3::packed_linear")
def _(x, codes, params, bits, out_features, out_float):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32 if out_float else torch.bfloat16)


class PackedLinear(nn.Module):
    """y = x W^T with W as packed codes; `dense_weight`, when kept, serves the rows the caller marks as prompt rows
    (and every row where the kernel cannot run). `out_float`: float32 outputs (the output head), else x's dtype."""

    bits: int

    def __init__(self, codes: torch.Tensor, params: torch.Tensor, in_features: int, out_features: int,
                 dense_weight: torch.Tensor | None = None, out_float: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.out_float = in_features, out_features, out_float
        self.register_buffer("codes", codes)    # the kernel's layout, see model/kernels/packed_linear.c
        self.register_buffer("params", params)  # float32 scales (and offsets), likewise
        self.dense_weight = None if dense_weight is None else nn.Parameter(dense_weight, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for, [N, K] in float32."""
        raise NotImplementedError

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if torch.compiler.is_compiling():
            return torch.ops.llama3.packed_linear.default(x, self.codes, self.params, self.bits, self.out_features,
                                                          self.out_float)
        return _packed_linear(x, self.codes, self.params, self.bits, self.out_features, self.out_float)

    def _dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_weight is None:  # no kernel and no dense copy: slow, but right
            return x.float() @ self.dequantize().t()
        return x.to(self.dense_weight.dtype) @ self.dense_weight.t()

    def forward(self, x: torch.Tensor, num_packed_rows: int | None = None) -> torch.Tensor:
        """x [M, K]. Rows from `num_packed_rows` on use the dense copy (when one is kept); None: all packed."""
        dtype = torch.float32 if self.out_float else x.dtype
        if not torch.compiler.is_compiling() and (x.device.type != "cpu" or packed_linear_kernel(self.bits) is None):
            num_packed_rows = 0  # (a compiled step without the kernel fails when prepared, and runs eagerly)
        elif self.dense_weight is None or num_packed_rows is None or num_packed_rows >= x.shape[0]:
            return self._packed_mm(x).to(dtype)
        if num_packed_rows == 0:
            return self._dense_mm(x).to(dtype)
        return torch.cat([self._packed_mm(x[:num_packed_rows]).to(dtype),
                          self._dense_mm(x[num_packed_rows:]).to(dtype)])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit groups of "
                f"{GROUP_SIZE}{', float32 outputs' if self.out_float else ''}"
                f"{', dense copy for prompts' if self.dense_weight is not None else ''}")


class Int4Linear(PackedLinear):
    bits = 4

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                   dense_weight: torch.Tensor | None = None, out_float: bool = False) -> Int4Linear:
        """codes int [N, K] in [0, 16); scales, offsets [N, K / 32] for `q * scale + offset`."""
        N, K = codes.shape
        _check_shapes(codes, scales, offsets)
        T, G = N // TILE, K // GROUP_SIZE
        # [T, 16 features, G, 2 halves, 8 pairs, 2] -> [T, G, 8 pairs, 16 features, 2, 2 halves]: a byte holds an
        # input feature of the group's first half in its low nibble and the matching one of the second half.
        q = codes.to(torch.uint8).reshape(T, TILE, G, 2, 8, 2).permute(0, 2, 4, 1, 5, 3)
        packed = (q[..., 0] | (q[..., 1] << 4)).reshape(T, G, 8, 32).contiguous()
        params = torch.stack([_tiled(scales), _tiled(offsets)], dim=2).contiguous()  # [T, G, 2, 16]
        return cls(packed, params, K, N, dense_weight, out_float)

    def dequantize(self) -> torch.Tensor:
        T, G = self.codes.shape[:2]
        low, high = (self.codes & 0x0F).reshape(T, G, 8, TILE, 2), (self.codes >> 4).reshape(T, G, 8, TILE, 2)
        q = torch.stack([low, high], dim=-1).permute(0, 3, 1, 5, 2, 4).reshape(self.out_features, self.in_features)
        scales, offsets = (_untiled(self.params[:, :, i]).repeat_interleave(GROUP_SIZE, 1) for i in (0, 1))
        return q.float() * scales + offsets


class Int8Linear(PackedLinear):
    bits = 8

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, dense_weight: torch.Tensor | None = None,
                   out_float: bool = False) -> Int8Linear:
        """codes int [N, K] in [-127, 127]; scales [N, K / 32] for `q * scale`."""
        N, K = codes.shape
        _check_shapes(codes, scales, scales)
        T, G = N // TILE, K // GROUP_SIZE
        # [T, 16 features, G, 16 pairs, 2] -> [T, G, 16 pairs, 16 features, 2]
        packed = codes.to(torch.int8).reshape(T, TILE, G, 16, 2).permute(0, 2, 3, 1, 4).reshape(T, G, 16, 32)
        return cls(packed.contiguous(), _tiled(scales).contiguous(), K, N, dense_weight, out_float)

    def dequantize(self) -> torch.Tensor:
        T, G = self.codes.shape[:2]
        q = self.codes.reshape(T, G, 16, TILE, 2).permute(0, 3, 1, 2, 4).reshape(self.out_features, self.in_features)
        return q.float() * _untiled(self.params).repeat_interleave(GROUP_SIZE, 1)


def fuse(layers: list[PackedLinear]) -> PackedLinear | None:
    """One packed layer whose output is the given layers' outputs side by side (q, k and v; gate and up), so a
    step calls the kernel once for them; None if they cannot be fused. The given layers keep working: their
    buffers become views of the fused layer's, so nothing is stored twice."""
    first = layers[0]
    if any(type(l) is not type(first) or l.in_features != first.in_features or l.out_float != first.out_float
           or (l.dense_weight is None) != (first.dense_weight is None) for l in layers):
        return None
    codes, params = torch.cat([l.codes for l in layers]), torch.cat([l.params for l in layers])  # tile-major
    dense = None if first.dense_weight is None else torch.cat([l.dense_weight.detach() for l in layers])
    fused = type(first)(codes, params, first.in_features, sum(l.out_features for l in layers), dense, first.out_float)
    tiles = rows = 0
    for layer in layers:
        n = layer.out_features
        layer.codes, layer.params = codes[tiles:tiles + n // TILE], params[tiles:tiles + n // TILE]
        if dense is not None:
            layer.dense_weight = nn.Parameter(dense[rows:rows + n], requires_grad=False)
        tiles, rows = tiles + n // TILE, rows + n
    return fused


def _check_shapes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> None:
    N, K = codes.shape
    if not packable(N, K) or scales.shape != (N, K // GROUP_SIZE) or offsets.shape != scales.shape:
        raise ValueError(f"a packed weight needs [N, K] codes with N divisible by {TILE} and K by {GROUP_SIZE}, "
                         f"and [N, K / {GROUP_SIZE}] scales; got {tuple(codes.shape)} and {tuple(scales.shape)}")


def _tiled(x: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N / 16, G, 16] float32."""
    N, G = x.shape
    return x.float().reshape(N // TILE, TILE, G).permute(0, 2, 1)


def _untiled(x: torch.Tensor) -> torch.Tensor:
    """[N / 16, G, 16] -> [N, G]."""
    T, G, _ = x.shape
    return x.permute(0, 2, 1).reshape(T * TILE, G)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K], scales and offsets [N, K / 32] such that codes * scale + offset ≈ weight (min/max per group)."""
    N, K = weight.shape
    if K % GROUP_SIZE:
        raise ValueError(f"int4 quantisation needs in_features divisible by {GROUP_SIZE}, got {K}")
    w = weight.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(-1), w.amax(-1)                                       # [N, K / 32]
    scales = ((hi - lo) / 15).clamp_min(1e-10)
    codes = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(N, K), scales, lo


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, K] in [-127, 127] and scales [N, K / 32] such that codes * scale ≈ weight (absmax per group)."""
    N, K = weight.shape
    if K % GROUP_SIZE:
        raise ValueError(f"int8 quantisation needs in_features divisible by {GROUP_SIZE}, got {K}")
    w = weight.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    scales = w.abs().amax(-1) / 127                                       # [N, K / 32]
    codes = (w / scales.clamp_min(1e-30)[..., None]).round().clamp(-127, 127).to(torch.int32)
    return codes.reshape(N, K), scales


# auto: a GGUF's 4- and 8-bit tensors as stored, on CPU; none: dense; int4 / int8: also quantise float weights
QUANTIZATIONS = ("auto", "none", "int4", "int8")


def quantize_model(model: nn.Module, stored: dict[str, tuple[torch.Tensor, ...]] | None, quantize_to: int | None,
                   only: set[str] | None = None, keep_dense: bool = True) -> dict[str, str]:
    """Replace the model's linear layers with packed ones, in place; returns {layer name: how}.

    A layer whose checkpoint weight is stored packed (`stored`, keyed by weight name: (codes, scales, offsets)
    at 4 bits, (codes, scales) at 8) is served exactly as stored. Others are quantised from their float weight to
    `quantize_to` bits, when given, else left dense. The output head is a linear like the others, also when it
    shares the embedding's weight (the embedding stays dense for its lookups); its outputs are float32.
    `only` limits the change to the layers it names. `keep_dense` keeps each layer's float weight too, in
    bfloat16, for prompt tokens (a tied head uses the embedding itself)."""
    stored = stored or {}
    done = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (only is not None and name not in only):
            continue
        weight = module.weight.detach()
        if not packable(*weight.shape):
            continue
        dense = (weight if weight.dtype == torch.bfloat16 else weight.to(torch.bfloat16)) if keep_dense else None
        out_float = name == "lm_head"
        parts = stored.get(f"{name}.weight")
        if parts is not None:
            layer = (Int4Linear if len(parts) == 3 else Int8Linear).from_codes(*parts, dense, out_float)
            how = "as stored"
        elif quantize_to == 4:
            layer, how = Int4Linear.from_codes(*quantize_int4(weight), dense, out_float), "quantised at load"
        elif quantize_to == 8:
            layer, how = Int8Linear.from_codes(*quantize_int8(weight), dense, out_float), "quantised at load"
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        done[name] = f"{layer.bits}-bit {how}"
    return done
