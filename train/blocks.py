"""How each transformer block runs: compiled or not, checkpointed or not, weights resident or swapped.

The diffusers transformer's own forward still runs the model (so training computes exactly what
inference computes); we only replace each block's `forward` with a `BlockForward`, which keeps the
module's names (LoRA keys and exports are unchanged) and adds, per block:

- gradient checkpointing (non-reentrant): the block keeps only its inputs and recomputes the rest
  in backward; `selective`: it also keeps its attention outputs, so backward recomputes only the
  linear layers and element-wise work, not attention (torchtitan's op-level selective checkpointing);
  optionally with what it keeps in pinned host memory (`HostOffload`, `offload_activations`),
  copied there on a side stream while the GPU computes;
- `torch.compile` of the checkpointed (or plain) block for the training step, wrapped in that order
  as torchtitan does, so the recomputation lives inside the compiled backward; graphs are shared
  between blocks. Previews and the held-out loss (no autograd) run the same blocks through a compiled
  function of their own, so they can never add graphs to, or evict graphs from, the training step's
  compiled code (Dynamo keeps graphs per code object); each side has a known, bounded set of graphs;
- block swap (`BlockSwap`): the block's frozen weights live in pinned host memory and are copied
  into one of two GPU slots on a side stream while the block before it computes; in backward, a
  hook on the block's output gradients copies them in again before the block's backward runs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from shared.errors import UserError

log = logging.getLogger(__name__)


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


def pinned_bytes(nbytes: float) -> float:
    """Pinned host memory torch takes for a tensor of `nbytes`: its host allocator rounds every request up
    to a power of two (ATen/core/CachingHostAllocator.h; `pinned_max_round_threshold_mb` is unset). A 20B
    int8 block's 0.33 GB of tensors take 0.5 GiB."""
    return float(2 ** math.ceil(math.log2(nbytes))) if nbytes >= 1 else 0.0


class BlockSwap:
    """Frozen weights of some blocks in pinned host memory; two GPU slots hold the ones about to run.

    All blocks have the same shapes, so the swapped blocks share two sets of GPU parameters (the
    slots): swapped block k (in forward order) always runs from slot k % 2, and "loading" a block
    is an in-place copy of its host bytes into its slot, on a side stream. Module devices, dtypes
    and shapes never change, so compiled code and LoRA layers see ordinary GPU parameters.

    While swapped block k runs, the next swapped block in the direction of travel (k + 1 in
    forward, k - 1 in backward) is copied into the other slot. The copy waits for everything
    already queued on the compute stream, so it never overwrites weights a queued kernel still
    reads; the block waits for its copy before it runs. Backward reads a block's weights again
    (its input gradients; its recomputation when checkpointed), long since overwritten in its slot:
    `BlockForward` calls `before(k, backward=True)` from a hook on block k's output gradients,
    which autograd runs before block k's backward. Weights only ever travel host -> GPU.
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
            needed = len(self.order) * sum(pinned_bytes(t.numel() * t.element_size()) for t in host) / 2**30
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
        # `.data`: a view with a version counter of its own. Autograd saved these tensors for the backward of
        # a block that ran from this slot before; that backward copies its weights back in before it runs.
        destination = [t.data for p in self.slots[slot] for t in plain_tensors(p)]
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
    """Saved-tensor hooks that keep what a checkpointed block saves (its inputs, and its attention
    outputs when selective) in pinned host memory.

    Unlike `torch.autograd.graph.save_on_cpu`, whose blocking copy makes the host wait for the GPU
    at every block (so kernels stop being queued ahead), the copy to the host runs on a side stream
    that first waits for the compute stream; the host never waits. Backward's copy back is queued on
    the compute stream after that copy's event. The host copy keeps the tensor's strides (compiled
    backward code checks them: attention's outputs are not contiguous); a tensor that is not dense
    (an expanded view) stays where it is, as do the frozen weights a compiled block saves for its
    backward (`weights`: their storages). On CPU the copy is a plain one.
    """

    def __init__(self, device: torch.device, weights: set[int]):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.weights = weights  # data pointers of the weights' storages (frozen and LoRA)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() in self.weights:
            return tensor
        cuda = tensor.device.type == "cuda"
        host = torch.empty_like(tensor, device="cpu", pin_memory=cuda)  # same strides where the tensor is dense
        if host.stride() != tensor.stride():
            return tensor
        if not cuda:
            host.copy_(tensor)
            return tensor.device, host, None
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
        if copied is not None:
            torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


# The attention kernels SDPA dispatches to. Their outputs (per block: [B, heads, tokens, head_dim] bf16,
# and a float32 log-sum-exp per head and token) are what a selectively checkpointed block keeps.
ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep attention's outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_selective_contexts = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
# torch's compiled-autograd cache keys a selectively checkpointed graph by its policy's `cache_hash` and, without
# one, compiles the graph again in every process: this policy is its bytecode, the names it reads and the ops
# it keeps (no source file read, so an install without .py files imports this too).
_selective_contexts.cache_hash = hashlib.sha256(
    _keep_attention.__code__.co_code
    + repr((_keep_attention.__code__.co_names, sorted(map(str, ATTENTION_OPS)))).encode()
).hexdigest()
# What selective checkpointing keeps goes through the offload hooks too (torch 2.14, pinned; older torch,
# as on the bench machine, has no such switch and offloads them only when the block is compiled).
_HOOKED = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


# The training step's block functions; `forward(block, *args)` is the block class's own forward. Each is
# a function of its own so that Dynamo keeps its graphs in a cache of their own (it caches per code
# object): previews never touch them, and checkpointed and plain blocks never share a recompile limit.
def _plain_block(forward: Callable, block: torch.nn.Module, *args):
    return forward(block, *args)


def _checkpointed_block(forward: Callable, block: torch.nn.Module, *args):
    return checkpoint(forward, block, *args, use_reentrant=False)


def _selectively_checkpointed_block(forward: Callable, block: torch.nn.Module, *args):
    return checkpoint(forward, block, *args, use_reentrant=False, context_fn=_selective_contexts, **_HOOKED)


# Previews and the held-out loss (no autograd, eval mode): their own function, so their own graphs.
def _inference_block(forward: Callable, block: torch.nn.Module, *args):
    return forward(block, *args)


# The graphs each of those functions compiles, each for any token count (sequence dimensions are dynamic).
# Training: one per kind of block (the first, whose input needs no gradient; the middle ones; the last,
# whose text-stream query is not adapted) and per prompt layout (a padding mask or none).
TRAINING_GRAPHS = 3 * 2
# Inference: without autograd the first block is like the middle ones; the last still differs. Per kind:
# previews and the held-out loss (eval mode; eval samples come one at a time, never padded; the base
# model's previews zero the LoRA instead of switching it off, so they run the same graph), and scheduled
# sampling's rollout (training mode, one sample of a batch at a time: its prompt padded or not).
INFERENCE_GRAPHS = 2 * 3


@functools.cache
def compiled(function: Callable) -> Callable:
    """`function` compiled (once per process). More graphs than planned is an error
    (`torch._dynamo.exc.FailOnRecompileLimitHit`), never a silent fallback to eager code."""
    import torch._dynamo

    limit = max(TRAINING_GRAPHS, INFERENCE_GRAPHS)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(function, fullgraph=True)


class CompiledInference:
    """The blocks' no-grad function, shared by all of them: compiled, and, should it ever need more graphs
    than `INFERENCE_GRAPHS`, eager from then on, said once in the log (previews are not worth a stopped run)."""

    def __init__(self):
        self.function: Callable | None = compiled(_inference_block)

    def __call__(self, forward: Callable, block: torch.nn.Module, *args):
        if self.function is not None:
            try:
                return self.function(forward, block, *args)
            except torch._dynamo.exc.FailOnRecompileLimitHit as err:
                log.warning(
                    "previews and the held-out loss run without compiling from now on: they needed more than the "
                    "%d graphs planned (%s); training is not affected. Please report it",
                    INFERENCE_GRAPHS,
                    str(err).splitlines()[0],
                )
                self.function = None
        return forward(block, *args)


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
    """Replaces `block.forward`: swap in, then run this block's training function (compiled or not), or,
    without autograd (previews, held-out loss), its inference function (`inference`; eager when None).

    Installed as an instance attribute, so `block(...)` (the transformer's own loop) calls it.
    """

    def __init__(
        self,
        block: torch.nn.Module,
        index: int,
        checkpointed: bool,
        selective: bool,
        offload: HostOffload | None,
        compile_block: bool,
        swap: BlockSwap | None,
        inference: CompiledInference | None = None,
    ):
        self.eager: Callable = type(block).forward.__get__(block)  # the class's forward, bound to this block
        self.signature = inspect.signature(self.eager)
        self.block = block
        function = _plain_block
        if checkpointed:
            function = _selectively_checkpointed_block if selective else _checkpointed_block
        self.train = compiled(function) if compile_block else function
        self.compile_block = compile_block
        self.inference = inference
        self.index, self.swap = index, swap
        self.offload = offload if checkpointed else None

    def __call__(self, *args, **kwargs):
        if self.swap is not None:
            self.swap.before(self.index, backward=False)
        if not torch.is_grad_enabled() and self.inference is None:
            return self.eager(*args, **kwargs)
        # Positional only: checkpoint saves positional tensors through autograd (so the offload hooks
        # can move them to the host) but would keep tensors passed by keyword on the GPU.
        bound = self.signature.bind(*args, **kwargs)
        if self.compile_block:
            mark_token_dimensions_dynamic(bound.arguments)
        if not torch.is_grad_enabled():  # previews and the held-out loss
            return self.inference(type(self.block).forward, self.block, *bound.args)
        with self.offload.hooks() if self.offload is not None else nullcontext():
            outputs = self.train(type(self.block).forward, self.block, *bound.args)
        if self.swap is not None:  # backward reads the weights again: load them when it reaches this block
            needing_grad = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
            if needing_grad:
                torch.autograd.graph.register_multi_grad_hook(needing_grad, self._before_backward, mode="any")
        return outputs

    def _before_backward(self, grad: torch.Tensor) -> None:
        self.swap.before(self.index, backward=True)


def install(
    transformer: torch.nn.Module,
    checkpointed: set[int],
    selective: bool,
    offload: bool,
    compile_blocks: bool,
    swap: BlockSwap | None,
) -> None:
    """Give every block of `transformer` its `BlockForward` (diffusers' own checkpointing stays off).
    `selective`: checkpointed blocks keep their attention outputs; `offload`: checkpointed blocks keep
    what they save in pinned host memory."""
    transformer.gradient_checkpointing = False
    host_offload = None
    if offload:
        weights = {t.untyped_storage().data_ptr() for p in transformer.parameters() for t in plain_tensors(p)}
        host_offload = HostOffload(next(transformer.parameters()).device, weights)
    inference = None
    if compile_blocks:  # graphs of an earlier model in this process (a test, a notebook) would count towards the limit
        torch._dynamo.reset()
        inference = CompiledInference()
    for index, block in enumerate(transformer.transformer_blocks):
        is_checkpointed = index in checkpointed
        block.forward = BlockForward(
            block, index, is_checkpointed, selective, host_offload, compile_blocks, swap, inference
        )
