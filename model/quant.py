"""Weight-only quantised linear layers, served exactly as a GGUF stores them, and the ways to fill them.

A weight is a code times a scale plus an offset, per group of 32 input features (16 for Q6_K). Three kinds of
scales cover llama.cpp's types (model/checkpoint/gguf_blocks.py decodes them):
  LEGACY  scale d and offset m per group, float16                      Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
  K32     scale D a, offset M b: D, M float16 per 256, a, b bytes per 32  Q4_K, Q5_K
  K16     scale D a, offset M a per half group: a a signed byte, M = -32 D  Q6_K
Codes are 4, 5, 6 or 8 bits. Every row, prompt or generated, is multiplied on the packed codes by our own CPU
kernel (model/kernels/packed_linear.c, through the op `llama3::packed_linear`): the codes are exact in bfloat16,
each half group's dot product runs on AVX-512 BF16 in float32, and the scales (products of a float16 and a byte,
exact in float32) are applied once per half group. Every row is computed on its own, so a row's result does
not depend on its batch, and no dense copy of a weight is kept. Where the kernel cannot run (no C compiler, no
AVX-512 BF16) layers are not packed: loading keeps them dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.kernels.cpu import packed_linear_kernel

GROUP_SIZE = 32  # input features per group of scales (Q6_K's halves are 16)
TILE = 16        # output features per tile of the kernel's layout
SUPER = 256      # input features per super-block of the K kinds
LEGACY, K32, K16 = 0, 1, 2  # kinds of scales, as the kernel numbers them


def packable(out_features: int, in_features: int) -> bool:
    return out_features % TILE == 0 and in_features % GROUP_SIZE == 0


@dataclass
class PackedWeight:
    """A quantised weight [N, K] in plain form: `codes` [N, K] (uint8 below 8 bits, int8 at 8), `d` and `m`
    float16 [N, U] (U = K / 32 for LEGACY, K / 256 otherwise), `sub` uint8 [N, K / 32, 2] (K32: a, b; K16: the
    two halves' a, signed) or None."""

    bits: int
    kind: int
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    sub: torch.Tensor | None = None

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each weight's scale and offset, [N, K] float32 (exact: products of a float16 and a byte)."""
        d, m = self.d.float(), self.m.float()
        if self.kind == LEGACY:
            return d.repeat_interleave(GROUP_SIZE, 1), m.repeat_interleave(GROUP_SIZE, 1)
        d, m = d.repeat_interleave(SUPER // 16, 1), m.repeat_interleave(SUPER // 16, 1)  # per half group
        if self.kind == K32:
            a, b = (self.sub[..., i].float().repeat_interleave(2, 1) for i in (0, 1))
        else:
            a = b = self.sub.view(torch.int8).reshape(self.sub.shape[0], -1).float()
        return (d * a).repeat_interleave(16, 1), (m * b).repeat_interleave(16, 1)

    def dequantize(self) -> torch.Tensor:
        scale, offset = self.scales()
        return self.codes.float() * scale + offset

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """The weight's rows `index` (the Q/K row order of a GGUF is undone this way)."""
        return PackedWeight(self.bits, self.kind, self.codes[index], self.d[index], self.m[index],
                            None if self.sub is None else self.sub[index])

    def row_range(self, start: int, end: int, pad_to: int | None = None) -> PackedWeight:
        """Output rows [start, end), then rows of zero codes and scales up to `pad_to` rows (a tensor-parallel
        shard)."""
        parts = [t[start:end] for t in (self.codes, self.d, self.m)] + [None if self.sub is None else self.sub[start:end]]
        if pad_to is not None and pad_to > end - start:
            parts = [None if t is None else torch.cat([t, t.new_zeros(pad_to - (end - start), *t.shape[1:])])
                     for t in parts]
        return PackedWeight(self.bits, self.kind, *parts)

    def column_range(self, start: int, end: int) -> PackedWeight:
        """Input columns [start, end), which must fall on the scales' groups (32 inputs; 256 for K kinds)."""
        unit = GROUP_SIZE if self.kind == LEGACY else SUPER
        if start % unit or end % unit:
            raise ValueError(f"a {self.bits}-bit weight can only be split every {unit} inputs, not at {start}:{end}")
        scales = slice(start // unit, end // unit)
        sub = None if self.sub is None else self.sub[:, start // GROUP_SIZE:end // GROUP_SIZE]
        return PackedWeight(self.bits, self.kind, self.codes[:, start:end], self.d[:, scales], self.m[:, scales], sub)


def _packed_linear(x: torch.Tensor, codes: torch.Tensor, high: torch.Tensor, scales: torch.Tensor, sub: torch.Tensor,
                   bits: int, kind: int, out_features: int, out_float: bool) -> torch.Tensor:
    kernel = packed_linear_kernel()
    if kernel is None:
        raise RuntimeError("the packed linear kernel is not available on this machine")
    return kernel(x, codes, high, scales, sub, bits, kind, out_features, torch.float32 if out_float else torch.bfloat16)


# A schema-defined op, so that a compiled decode step calls the kernel as one opaque node (see model/attention.py).
_library = torch.library.Library("llama3", "FRAGMENT")
_library.define("packed_linear(Tensor x, Tensor codes, Tensor high, Tensor scales, Tensor sub, int bits, int kind, "
                "int out_features, bool out_float) -> Tensor")
_library.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("llama3::packed_linear")
def _(x, codes, high, scales, sub, bits, kind, out_features, out_float):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32 if out_float else torch.bfloat16)


def _tiled(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N / 16, ..., 16]: a tile's 16 features side by side, innermost."""
    return x.reshape(x.shape[0] // TILE, TILE, *x.shape[1:]).movedim(1, -1)


def _untiled(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `_tiled`."""
    x = x.movedim(-1, 1)
    return x.reshape(x.shape[0] * TILE, *x.shape[2:])


def _bit_masks(bit: torch.Tensor) -> torch.Tensor:
    """[..., 32] of 0/1 -> [...] 32-bit masks, lane i in bit i, as int32."""
    packed = np.packbits(bit.numpy().astype(bool), axis=-1, bitorder="little")  # [..., 4] bytes, little-endian
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32)[..., 0])


class PackedLinear(nn.Module):
    """y = x W^T with W packed in the kernel's layout (model/kernels/packed_linear.c). `out_float`: float32
    outputs (the output head), else x's dtype."""

    def __init__(self, bits: int, kind: int, codes: torch.Tensor, high: torch.Tensor, scales: torch.Tensor,
                 sub: torch.Tensor, in_features: int, out_features: int, out_float: bool = False):
        super().__init__()
        self.bits, self.kind = bits, kind
        self.in_features, self.out_features, self.out_float = in_features, out_features, out_float
        self.register_buffer("codes", codes)    # [T, G, 8, 32] low nibbles, or [T, G, 16, 32] int8
        self.register_buffer("high", high)      # [T, G, 8, planes] int32 bit masks (5 and 6 bits), else empty
        self.register_buffer("scales", scales)  # [T, U, 2, 16] float16: d (or D), m (or M)
        self.register_buffer("sub", sub)        # [T, G, 2, 16] uint8 sub-scales (K kinds), else empty

    @classmethod
    def from_weight(cls, w: PackedWeight, out_float: bool = False, chunk: int = 4096) -> PackedLinear:
        N, K = w.codes.shape
        if not packable(N, K) or (w.kind != LEGACY and K % SUPER):
            raise ValueError(f"a packed weight needs N divisible by {TILE} and K by {GROUP_SIZE} "
                             f"({SUPER} for K-quants); got {N} x {K}")
        if N > chunk:  # whole tiles, `chunk` rows at a time: packing takes temporaries several times the codes
            parts = [cls.from_weight(w.row_range(i, min(i + chunk, N)), out_float, chunk) for i in range(0, N, chunk)]
            names = ("codes", "high", "scales", "sub")
            return cls(w.bits, w.kind, *(torch.cat([getattr(p, n) for p in parts]) for n in names), K, N, out_float)
        T, G = N // TILE, K // GROUP_SIZE
        scales = _tiled(torch.stack([w.d, w.m], dim=1).to(torch.float16)).contiguous()  # [T, 2, U, 16] -> below
        scales = scales.permute(0, 2, 1, 3).contiguous()                                    # [T, U, 2, 16]
        sub = torch.empty(0, dtype=torch.uint8) if w.sub is None else _tiled(w.sub.to(torch.uint8)).contiguous()
        if w.bits == 8:
            # [T, 16 features, G, 16 pairs, 2] -> [T, G, 16 pairs, 16 features, 2]
            codes = w.codes.to(torch.int8).reshape(T, TILE, G, 16, 2).permute(0, 2, 3, 1, 4).reshape(T, G, 16, 32)
            return cls(8, w.kind, codes.contiguous(), torch.empty(0, dtype=torch.int32), scales, sub, K, N, out_float)
        # [T, 16 features, G, 2 halves, 8 chunks, 2] -> [T, G, 8 chunks, 16 features, 2, 2 halves]: lane i of chunk c
        # is feature i / 2 and input 2c + i % 2 of each half.
        q = w.codes.to(torch.uint8).reshape(T, TILE, G, 2, 8, 2).permute(0, 2, 4, 1, 5, 3).reshape(T, G, 8, 32, 2)
        codes = ((q[..., 0] & 15) | ((q[..., 1] & 15) << 4)).contiguous()
        planes = [(q[..., half] >> bit) & 1 for bit in range(4, w.bits) for half in (0, 1)]
        high = (torch.stack([_bit_masks(p) for p in planes], dim=-1).contiguous() if planes
                else torch.empty(0, dtype=torch.int32))
        return cls(w.bits, w.kind, codes, high, scales, sub, K, N, out_float)

    def weight(self) -> PackedWeight:
        """The plain form of the packed weight (the inverse of `from_weight`)."""
        T, G = self.codes.shape[:2]
        N, K = self.out_features, self.in_features
        d, m = _untiled(self.scales.permute(0, 2, 1, 3)).unbind(1)                      # [N, U] each
        sub = None if self.kind == LEGACY else _untiled(self.sub)                       # [N, G, 2]
        if self.bits == 8:
            codes = self.codes.reshape(T, G, 16, TILE, 2).permute(0, 3, 1, 2, 4).reshape(N, K)
            return PackedWeight(8, self.kind, codes.contiguous(), d, m, sub)
        low = torch.stack([self.codes & 15, self.codes >> 4], dim=-1)                    # [T, G, 8, 32, 2]
        for plane, bit in enumerate(range(4, self.bits)):
            for half in (0, 1):
                masks = self.high[..., plane * 2 + half].to(torch.int64) & 0xFFFFFFFF          # [T, G, 8]
                bits = (masks[..., None] >> torch.arange(32)) & 1                        # [T, G, 8, 32]
                low[..., half] |= (bits << bit).to(torch.uint8)
        codes = low.reshape(T, G, 8, TILE, 2, 2).permute(0, 3, 1, 5, 2, 4).reshape(N, K)
        return PackedWeight(self.bits, self.kind, codes, d, m, sub)

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for, [N, K] in float32."""
        return self.weight().dequantize()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` [n] of the weight, [n, K] in float32, read from the tiles without unpacking the rest."""
        n, G = index.shape[0], self.codes.shape[1]
        tile, feature = index // TILE, index % TILE
        lanes = torch.stack([2 * feature, 2 * feature + 1], dim=-1)                       # [n, 2]: the row's lanes
        d, m = self.scales[tile].gather(3, feature[:, None, None, None].expand(n, self.scales.shape[1], 2, 1)
                                        ).squeeze(3).unbind(2)                          # [n, U] each
        sub = None
        if self.kind != LEGACY:
            sub = self.sub[tile].gather(3, feature[:, None, None, None].expand(n, G, 2, 1)).squeeze(3)
        if self.bits == 8:  # pair p, lane 2f + j: input 2p + j
            q = self.codes[tile].gather(3, lanes[:, None, None, :].expand(n, G, 16, 2))  # [n, G, 16, 2]
            return PackedWeight(8, self.kind, q.reshape(n, -1), d, m, sub).dequantize()
        b = self.codes[tile].gather(3, lanes[:, None, None, :].expand(n, G, 8, 2))      # [n, G, 8 chunks, 2]
        # Both nibbles by one broadcast shift rather than a stack: compiled with the bit planes below, Inductor's
        # concatenation gave a layout its own stride check then refused (torch 2.13), and the step ran eagerly.
        nibbles = torch.arange(0, 8, 4, dtype=torch.uint8, device=b.device)[:, None, None]      # [2, 1, 1]
        q = (b[:, :, None] >> nibbles) & 15                                               # [n, G, 2 halves, 8, 2]
        for plane, bit in enumerate(range(4, self.bits)):
            masks = self.high[tile][..., 2 * plane:2 * plane + 2].to(torch.int64) & 0xFFFFFFFF  # [n, G, 8, halves]
            bits = (masks[..., None] >> lanes[:, None, None, None, :]) & 1                # [n, G, 8, halves, 2]
            q |= (bits.permute(0, 1, 3, 2, 4) << bit).to(torch.uint8)
        return PackedWeight(self.bits, self.kind, q.reshape(n, -1), d, m, sub).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N]: every row on the packed codes (in bfloat16, accumulated in float32), the result in x's
        dtype (float32 for the output head)."""
        dtype = x.dtype
        args = (x.to(torch.bfloat16), self.codes, self.high, self.scales, self.sub, self.bits, self.kind,
                self.out_features, self.out_float)
        if torch.compiler.is_compiling():
            y = torch.ops.llama3.packed_linear.default(*args)
        else:
            y = _packed_linear(*args)
        return y if self.out_float or dtype == torch.bfloat16 else y.to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in (self.codes, self.high, self.scales, self.sub))

    def extra_repr(self) -> str:
        kind = {LEGACY: "groups of 32", K32: "K-quant groups of 32", K16: "K-quant groups of 16"}[self.kind]
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit {kind}"
                f"{', float32 outputs' if self.out_float else ''}")


class PackedEmbedding(nn.Module):
    """Token embeddings read from packed rows: no dense table is kept (a tied output head shares the codes)."""

    def __init__(self, table: PackedLinear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids.reshape(-1)).to(self.dtype).reshape(*ids.shape, self.embedding_dim)


def fuse(layers: list[PackedLinear]) -> PackedLinear | None:
    """One packed layer whose output is the given layers' outputs side by side (q, k and v; gate and up), so a
    step calls the kernel once for them; None if they cannot be fused (different formats). The given layers keep
    working: their buffers become views of the fused layer's, so nothing is stored twice."""
    first = layers[0]
    if any((l.bits, l.kind, l.in_features, l.out_float) != (first.bits, first.kind, first.in_features,
                                                           first.out_float) for l in layers):
        return None
    names = ("codes", "high", "scales", "sub")
    joined = {n: torch.cat([getattr(l, n) for l in layers]) for n in names}  # tile-major
    fused = PackedLinear(first.bits, first.kind, *joined.values(), first.in_features,
                         sum(l.out_features for l in layers), first.out_float)
    tiles = 0
    for layer in layers:
        n = layer.out_features // TILE
        for name in names:
            if joined[name].numel():
                setattr(layer, name, joined[name][tiles:tiles + n])
        tiles += n
    return fused


def quantize_int4(weight: torch.Tensor) -> PackedWeight:
    """Asymmetric min/max quantisation to 4 bits, 32 input features per group, float16 scale and offset (as
    llama.cpp's Q4_1): codes * scale + offset ≈ weight."""
    N, K = weight.shape
    if K % GROUP_SIZE:
        raise ValueError(f"int4 quantisation needs in_features divisible by {GROUP_SIZE}, got {K}")
    w = weight.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(-1), w.amax(-1)                                       # [N, K / 32]
    d = ((hi - lo) / 15).clamp_min(1e-7).to(torch.float16)
    m = lo.to(torch.float16)
    codes = ((w - m.float()[..., None]) / d.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return PackedWeight(4, LEGACY, codes.reshape(N, K), d, m)


def quantize_int8(weight: torch.Tensor) -> PackedWeight:
    """Symmetric absmax quantisation to 8 bits, 32 input features per group, float16 scale (llama.cpp's Q8_0)."""
    N, K = weight.shape
    if K % GROUP_SIZE:
        raise ValueError(f"int8 quantisation needs in_features divisible by {GROUP_SIZE}, got {K}")
    w = weight.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    d = (w.abs().amax(-1) / 127).clamp_min(1e-7).to(torch.float16)
    codes = (w / d.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return PackedWeight(8, LEGACY, codes.reshape(N, K), d, torch.zeros_like(d))


# auto: a GGUF's packed types as stored, on CPU; none: dense; int4 / int8: also quantise float weights
QUANTIZATIONS = ("auto", "none", "int4", "int8")


def quantize_model(model: nn.Module, stored: dict[str, PackedWeight] | None, quantize_to: int | None,
                   only: set[str] | None = None) -> dict[str, str]:
    """Replace the model's linear layers with packed ones, in place; returns {layer name: how}.

    A layer whose checkpoint weight is stored packed (`stored`, keyed by weight name) is served exactly as stored.
    Others are quantised from their float weight to `quantize_to` bits, when given, else left dense. The output
    head is a linear like the others, also when it shares the embedding's weight; its outputs are float32.
    `only` limits the change to the layers it names."""
    stored = stored or {}
    done = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (only is not None and name not in only):
            continue
        weight = module.weight.detach()
        if not packable(*weight.shape):
            continue
        packed = stored.get(f"{name}.weight")
        how = "as stored"
        if packed is None and quantize_to in (4, 8):
            packed, how = (quantize_int4 if quantize_to == 4 else quantize_int8)(weight), "quantised at load"
        if packed is None:
            continue
        layer = PackedLinear.from_weight(packed, out_float=name == "lm_head")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        done[name] = f"{layer.bits}-bit {how}"
    return done
