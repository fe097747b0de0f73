"""How each transformer block runs: compiled or not, checkpointed or not, weights resident or swapped.

The diffusers transformer's own forward still runs the model (so training computes exactly what
inference computes); we only replace each block's `forward` with a `BlockForward`, which keeps the
module's names (LoRA keys and exports are unchanged) and adds, per block:

- `torch.compile` of the block's own forward for the training step only (graphs shared between
  blocks); previews and the held-out loss (no autograd) run the same blocks eagerly, so they can
  never add graphs to, or evict graphs from, the training step's compiled code;
- gradient checkpointing (non-reentrant): the block keeps only its inputs and recomputes the rest
  in backward, optionally with those inputs in pinned host memory (`HostOffload`,
  `offload_activations`), copied there on a side stream while the GPU computes;
- block swap (`BlockSwap`): the block's frozen weights live in pinned host memory and are copied
  into one of two GPU slots on a side stream while the block before it computes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from shared.errors import UserError


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s bytes: itself, or a quanto tensor's inner data and scales."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in plain_tensors(getattr(tensor, name))]


def frozen_parameters(block: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """(module, name, parameter) for every frozen parameter of `block`, in a fixed order (LoRA excluded)."""
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None and not param.requires_grad:
                yield module, name, param


class BlockSwap:
    """Frozen weights of some blocks in pinned host memory; two GPU slots hold the ones about to run.

    All blocks have the same shapes, so the swapped blocks share two sets of GPU parameters (the
    slots): swapped block k (in forward order) always runs from slot k % 2, and "loading" a block
    is an in-place copy of its host bytes into its slot, on a side stream. Module devices, dtypes
    and shapes never change, so compiled code and LoRA layers see ordinary GPU parameters.

    While swapped block k runs, the next swapped block in the direction of travel (k + 1 in
    forward, k - 1 in the backward pass's recomputation) is copied into the other slot. The copy
    waits for everything already queued on the compute stream, so it never overwrites weights a
    queued kernel still reads; the block waits for its copy before it runs. Swapped blocks must be
    checkpointed: otherwise autograd would keep slot weights for backward that a later copy overwrites.
    """

    def __init__(self, swapped: list[int], device: torch.device):
        self.order = sorted(swapped)
        self.position = {index: k for k, index in enumerate(self.order)}  # k-th swapped block in forward order
        self.slot_of = {index: k % 2 for index, k in self.position.items()}
        self.device = device
        self.host: dict[int, list[torch.Tensor]] = {}  # block index -> its plain tensors, pinned
        self.slots: list[list[torch.nn.Parameter]] = [[], []]  # the shared GPU parameters of each slot
        self.resident: list[int | None] = [None, None]  # which block's bytes each slot holds
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copies = 0  # blocks copied host -> GPU so far (for tests and logs)

    def adopt(self, index: int, block: torch.nn.Module) -> None:
        """Take block `index` (frozen, quantised or not, on any device): keep its bytes on the host, run it
        from its slot."""
        params = list(frozen_parameters(block))
        host = [t.detach().cpu() for _, _, p in params for t in plain_tensors(p)]
        try:
            self.host[index] = [t.pin_memory() if self.device.type == "cuda" else t.clone() for t in host]
        except RuntimeError as err:  # pinned (page-locked) memory is limited by the OS and the container
            needed = len(self.order) * sum(t.numel() * t.element_size() for t in host) / 2**30
            raise UserError(
                f"could not keep swapped block {index} in pinned host memory ({err}); {len(self.order)} swapped "
                f"blocks need about {needed:.1f} GiB of it. Lower blocks_to_swap, or free host memory."
            ) from None
        slot = self.slot_of[index]
        if not self.slots[slot]:  # the first block of a slot lends it its own parameters
            block.to(self.device)
            self.slots[slot] = [p for _, _, p in frozen_parameters(block)]
            self.resident[slot] = index
            return
        if [p.shape for _, _, p in params] != [p.shape for p in self.slots[slot]]:
            raise ValueError(f"block {index} differs in shape from the other swapped blocks")
        for (module, name, _), shared in zip(params, self.slots[slot], strict=True):
            module._parameters[name] = shared  # the block's own copy is freed: the host copy is its weights now
        block.to(self.device)  # buffers (small) stay resident

    def before(self, index: int, backward: bool) -> None:
        """Block `index` is about to run: make its weights resident and start fetching the next one."""
        if index not in self.slot_of:
            return
        slot = self.slot_of[index]
        if self.resident[slot] != index:  # not prefetched (the first block of a pass)
            self._load(index)
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        k = self.position[index] + (-1 if backward else 1)
        if 0 <= k < len(self.order) and self.resident[self.slot_of[self.order[k]]] != self.order[k]:
            self._load(self.order[k])

    def _load(self, index: int) -> None:
        slot = self.slot_of[index]
        destination = [t for p in self.slots[slot] for t in plain_tensors(p)]
        if self.stream is None:  # CPU: a plain copy, in order
            for dst, src in zip(destination, self.host[index], strict=True):
                dst.copy_(src)
        else:
            queued = torch.cuda.current_stream(self.device).record_event()  # last use of this slot is queued
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(queued)
                for dst, src in zip(destination, self.host[index], strict=True):
                    dst.copy_(src, non_blocking=True)
                self.ready[slot] = self.stream.record_event()
        self.resident[slot] = index
        self.copies += 1


class HostOffload:
    """Saved-tensor hooks that keep what a checkpointed block saves (its inputs) in pinned host memory.

    Unlike `torch.autograd.graph.save_on_cpu`, whose blocking copy makes the host wait for the GPU
    at every block (so kernels stop being queued ahead), the copy to the host runs on a side stream
    that first waits for the compute stream; the host never waits. Backward's copy back is queued on
    the compute stream after that copy's event. On CPU the tensors are kept as they are.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if self.stream is None or tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor's producer is queued
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its GPU memory is not reused before the copy is done
            copied = self.stream.record_event()
        return tensor.device, host, copied

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


def _training_block(forward: Callable, block: torch.nn.Module, *args):
    """`forward(block, *args)`: the block class's own forward. A function of its own so that Dynamo keeps
    the training step's graphs in a cache of their own (Dynamo caches per code object)."""
    return forward(block, *args)


# The graphs the training step compiles: one per kind of block (the first, whose input needs no
# gradient; the middle ones; the last, whose text-stream query is not adapted) and per prompt
# layout (a padding mask or none), each for any token count (sequence dimensions are dynamic).
TRAINING_GRAPHS = 3 * 2


@functools.cache
def compile_training_blocks() -> Callable:
    """The compiled training forward shared by every block. More graphs than `TRAINING_GRAPHS` is an
    error (`torch._dynamo.exc.FailOnRecompileLimitHit`), never a silent fallback to eager code, which
    would make a checkpointed block's recomputation differ from its forward."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, TRAINING_GRAPHS)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(_training_block, fullgraph=True)


# The token dimension of each block input: hidden_states [B, N, D] (image tokens: target and references),
# encoder_hidden_states [B, L, D] and its mask [B, L] (prompt tokens), modulate_index [B, N] (zero_cond_t).
TOKEN_DIMENSIONS = {
    "hidden_states": 1,
    "encoder_hidden_states": 1,
    "encoder_hidden_states_mask": 1,
    "modulate_index": 1,
}


def mark_token_dimensions_dynamic(arguments: dict) -> None:
    """Compile for any token count from the first step on (buckets and prompt lengths vary), instead
    of for the first shape and then again, dynamically, for the second. `arguments`: the block's, by name."""
    for name, dim in TOKEN_DIMENSIONS.items():
        if isinstance(arguments.get(name), torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(arguments[name], dim)
    for freqs in arguments.get("image_rotary_emb") or ():  # RoPE of the image tokens [N, d], of the prompt [L, d]
        torch._dynamo.maybe_mark_dynamic(freqs, 0)


class BlockForward:
    """Replaces `block.forward`: swap in, then run (compiled or not) under checkpointing or not.

    Installed as an instance attribute, so `block(...)` (the transformer's own loop) calls it.
    The recomputation in backward calls `run` directly, which is how `run` tells the two apart.
    Without autograd (previews, held-out loss) the block runs eagerly: see the module docstring.
    """

    def __init__(
        self,
        block: torch.nn.Module,
        index: int,
        checkpointed: bool,
        offload: HostOffload | None,
        compiled: bool,
        swap: BlockSwap | None,
    ):
        self.eager: Callable = type(block).forward.__get__(block)  # the class's forward, bound to this block
        self.signature = inspect.signature(self.eager)
        self.block = block
        self.compiled = compile_training_blocks() if compiled else None
        self.index, self.checkpointed, self.offload, self.swap = index, checkpointed, offload, swap
        self._in_forward = False

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # previews and the held-out loss: eager, whatever the plan
            if self.swap is not None:
                self.swap.before(self.index, backward=False)
            return self.eager(*args, **kwargs)
        # Positional only: checkpoint saves positional tensors through autograd (so save_on_cpu can
        # move them to the host) but would keep tensors passed by keyword on the GPU.
        bound = self.signature.bind(*args, **kwargs)
        args = bound.args
        if self.compiled is not None:
            mark_token_dimensions_dynamic(bound.arguments)
        if not self.checkpointed:
            return self.run(*args)
        self._in_forward = True
        try:
            if self.offload is not None:  # the inputs checkpoint saves go to pinned host memory until backward
                with self.offload.hooks():
                    return checkpoint(self.run, *args, use_reentrant=False)
            return checkpoint(self.run, *args, use_reentrant=False)
        finally:
            self._in_forward = False

    def run(self, *args):
        if self.swap is not None:
            recomputing = self.checkpointed and not self._in_forward
            self.swap.before(self.index, backward=recomputing)
        if self.compiled is not None:
            return self.compiled(type(self.block).forward, self.block, *args)
        return self.eager(*args)


def attention_backends(enabled: bool):
    """Prefer cuDNN's fused attention, then flash attention, for every SDPA call in this context; a
    no-op context when not `enabled`. (On an H100 it changed nothing measurable: bench/RESULTS.md.)"""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not enabled:
        return nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def install(
    transformer: torch.nn.Module,
    checkpointed: set[int],
    offload: bool,
    compiled: bool,
    swap: BlockSwap | None,
) -> None:
    """Give every block of `transformer` its `BlockForward` (diffusers' own checkpointing stays off);
    `offload`: checkpointed blocks keep their inputs in pinned host memory."""
    transformer.gradient_checkpointing = False
    host_offload = HostOffload(next(transformer.parameters()).device) if offload else None
    if compiled:  # graphs of an earlier model in this process (a test, a notebook) would count towards the limit
        torch._dynamo.reset()
    for index, block in enumerate(transformer.transformer_blocks):
        if swap is not None and index in swap.slot_of and index not in checkpointed:
            raise ValueError(f"block {index} is swapped, so it must be checkpointed")
        block.forward = BlockForward(block, index, index in checkpointed, host_offload, compiled, swap)
