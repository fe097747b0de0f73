"""Frozen int8 / fp8 layers computed in ops torch.compile can fuse: the same numbers as quanto, the int8 weight
(not a bf16 copy) kept for backward, and no quanto operator left in the compiled graph."""

from __future__ import annotations

import pytest
import torch
from optimum.quanto import QLinear, freeze, qfloat8, qint4, qint8, quantize
from optimum.quanto.library.qbytes_mm import qbytes_mm

from train.quantised_linear import DequantisingQLinear, use_dequantising_linears


def quantised(qtype, bias: bool = True, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=bias), torch.nn.GELU(), torch.nn.Linear(96, 32))
    model.to(torch.bfloat16)
    quantize(model, weights=qtype)
    freeze(model)
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("qtype", [qint8, qfloat8], ids=["int8", "fp8"])
def test_outputs_equal_quantos_cuda_arithmetic_bit_for_bit(qtype):
    model = quantised(qtype)
    assert use_dequantising_linears(model) == 2
    layer = model[0]
    assert isinstance(layer, DequantisingQLinear) and isinstance(layer, QLinear)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    # quanto's `qbytes_mm` (what its CUDA operator runs for bf16 activations), then the bias, as quanto adds it
    want = qbytes_mm(x.reshape(-1, 64), layer.weight._data, layer.weight._scale).reshape(2, 7, 96) + layer.bias
    assert torch.equal(layer(x), want)


def test_backward_gives_the_input_gradient_and_keeps_the_quantised_weight_not_a_bf16_copy():
    model = quantised(qint8)
    use_dequantising_linears(model)
    layer = model[0]
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert {t.dtype for t in saved} == {torch.int8, torch.bfloat16} and max(t.numel() for t in saved) == 96 * 64
    assert not any(t.dtype == torch.bfloat16 and t.shape == (96, 64) for t in saved)
    grad = torch.randn_like(y)
    y.backward(grad)
    weight = layer.weight._scale * layer.weight._data  # the dequantised weight [96, 64]
    assert torch.equal(x.grad, grad @ weight)
    assert all(p.grad is None for p in layer.parameters())  # frozen


def test_compiled_graph_has_no_quanto_operator_and_matches_eager():
    model = quantised(qint8)
    use_dequantising_linears(model)
    targets = []

    def capture(graph_module: torch.fx.GraphModule, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture, fullgraph=True)
    y = compiled(x)
    assert targets and not any("quanto" in target for target in targets), targets
    torch.testing.assert_close(y, model(x))
    y.sum().backward()  # the autograd Function's backward runs from the compiled graph
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("qtype", [qint8, qfloat8], ids=["int8", "fp8"])
def test_compiled_step_keeps_the_quantised_weights_for_backward_never_bf16_copies(qtype):
    """What the compiled graph saves for backward (inductor's partitioner chooses): at real size a bf16 copy of every
    weight would be +27 GiB."""
    model = quantised(qtype)
    use_dequantising_linears(model)
    weights = {tuple(m.weight.shape) for m in model if isinstance(m, QLinear)}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = compiled(x)
    copies = [tuple(t.shape) for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in weights]
    assert not copies, f"bf16 weights saved for backward: {copies}"
    assert {tuple(t.shape) for t in saved if t.dtype == model[0].weight._data.dtype} == weights
    y.sum().backward()
    assert x.grad is not None


def test_a_later_run_finds_the_compiled_training_graph_in_the_cache(tmp_path, monkeypatch):
    """A user's second run loads the training graph (forward and backward) from AOTAutograd's cache instead of
    tracing it again; graphs holding an autograd Function are never cached there."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    model = quantised(qint8)
    use_dequantising_linears(model)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # a first run, then a fresh process's view of the same compile caches
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model, fullgraph=True)(x).sum().backward()
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1, dict(counters["aot_autograd"])


def test_packed_and_unquantised_layers_keep_their_own_kernels():
    model = quantised(qint4)  # quanto packs 4-bit weights: its own kernels stay
    assert use_dequantising_linears(model) == 0
    assert all(type(m) is QLinear for m in model if isinstance(m, QLinear))
    keys = set(quantised(qint8).state_dict())
    switched = quantised(qint8)
    use_dequantising_linears(switched)
    assert set(switched.state_dict()) == keys  # checkpoints and exports see the same names
