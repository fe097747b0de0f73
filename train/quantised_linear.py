"""Frozen int8 / fp8 linear layers (optimum-quanto) whose dequantisation torch.compile can see and fuse.

quanto multiplies a layer's int8 weight by its per-output-channel scales inside its own operator
(`quanto::qbytes_mm`), which torch.compile treats as a black box: every call runs PyTorch's generic
mixed-dtype multiply (int8 × bf16) eagerly, at about a third of the memory bandwidth, ~2,000 times a
step at real size (bench/RESULTS.md, "Profile of the old `low` step"). `DequantisingQLinear` does the
same arithmetic as quanto's CUDA path for bf16 activations (`qbytes_mm`: scale × weight, then a matmul,
then the bias) in ordinary torch ops, and keeps only the quantised weight for backward, never a bf16
copy of it:

- eager, through an autograd Function (`DequantisedLinear`) that saves the int8 weight and dequantises
  it again in backward: the very kernels quanto runs;
- compiled, as plain ops with the dequantisation under `checkpoint`, which tells the compiler to
  recompute it in backward; each layer's dequantisation becomes one fused kernel. (Compiled, the
  autograd Function would work too, but AOTAutograd never caches graphs that hold one, so every run
  would trace them again: a slower start for a user's second run.)

Outputs equal quanto's `qbytes_mm` bit for bit. int8 and fp8 weights change (fp8 that quanto packed for its
Marlin kernel on a GPU is unpacked back first); the 4- and 2-bit layouts and bitsandbytes keep their own
kernels.
"""

from __future__ import annotations

import torch
from optimum.quanto import QLinear
from optimum.quanto.tensor.weights.marlin import MarlinF8QBytesTensor
from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor
from torch.utils.checkpoint import checkpoint


def dequantise(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[out, in] weight in `scale`'s dtype from its quantised `data` [out, in] and `scale` [out, 1]; the
    same multiply as quanto's `qbytes_mm` (fp8 promoted explicitly first, as there)."""
    if data.dtype.is_floating_point:
        data = data.to(scale.dtype)
    return scale * data


def matmul_as_quanto(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in]ᵀ -> [..., out], in the weight's dtype, over the tokens flattened to one
    dimension, as quanto's `qbytes_mm` multiplies (no bias)."""
    flat = x.to(weight.dtype).reshape(-1, x.shape[-1])  # [tokens, in]
    return torch.matmul(flat, weight.t()).reshape(*x.shape[:-1], weight.shape[0])


class DequantisedLinear(torch.autograd.Function):
    """y = x @ dequantise(data, scale)ᵀ for a frozen weight: gradients for `x` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], computed in `scale`'s dtype (bf16) as quanto does."""
        ctx.save_for_backward(data, scale)  # the int8 weight: backward dequantises it again
        return matmul_as_quanto(x, dequantise(data, scale))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        data, scale = ctx.saved_tensors
        return torch.matmul(grad, dequantise(data, scale)), None, None  # [..., out] @ [out, in] -> [..., in]


class DequantisingQLinear(QLinear):
    """quanto's `QLinear` with a frozen plain-layout weight, computed as the module docstring says."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        data, scale = self.weight._data, self.weight._scale
        if torch.compiler.is_compiling():  # see the module docstring
            weight = checkpoint(dequantise, data, scale, use_reentrant=False)  # [out, in], recomputed in backward
            output = matmul_as_quanto(input, weight)
        else:
            output = DequantisedLinear.apply(input, data, scale)
        return output if self.bias is None else output + self.bias


def plain_layout(weight: MarlinF8QBytesTensor) -> WeightQBytesTensor:
    """The fp8 weight quanto repacked for its Marlin kernel (on a CUDA GPU of compute capability 8 or more),
    back in the plain layout: the same fp8 values [out, in] and per-row scales [out, 1]."""
    plain = weight.weight_qbytes_tensor()
    plain.activation_qtype = None  # Marlin's own setting, for its kernel's activations; ours stay bf16
    return plain


def use_dequantising_linears(module: torch.nn.Module) -> int:
    """Switch every frozen quanto linear layer in `module` with an int8 / fp8 weight to `DequantisingQLinear`
    (same parameters, names and state dict); returns how many changed. Call it once the layers are on their
    device: quanto repacks fp8 weights arriving on a GPU for its Marlin kernel, which torch.compile cannot run
    (Dynamo's fake-tensor pass failed on the H200), and those are unpacked back (`plain_layout`)."""
    changed = 0
    for layer in module.modules():
        if type(layer) is QLinear and type(layer.weight) is MarlinF8QBytesTensor:
            layer.weight = torch.nn.Parameter(plain_layout(layer.weight), requires_grad=False)
        if type(layer) is QLinear and type(layer.weight) is WeightQBytesTensor:
            layer.__class__ = DequantisingQLinear
            changed += 1
    return changed
