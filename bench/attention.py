"""Where a training step's time goes: each SDPA backend at the edit shapes, and one real block's profile.

    python bench/attention.py                       # backends at edit-v1 and edit-v2 shapes, then a block profile
    python bench/attention.py --skip-profile

Part 1 times joint attention alone (one sample, 24 heads of 128, bf16, forward + backward) with each
SDPA backend, eager and inside `torch.compile`, and prints TFLOP/s (forward 4·T²·d, backward 2.5×).
Part 2 builds one real-size Qwen-Image block (bf16, LoRA-free: the frozen path costs the same),
compiles it as `train run` does, runs forward + backward under the loop's attention priority, and
lists the CUDA kernels that took the most time, grouped as attention / matmul / other. Together
they say how much of a step attention is and whether a faster backend would help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS, HEAD_DIM = 24, 128
SHAPES = {"edit-v1": 4096 * 2 + 1400, "edit-v2": 4096 * 4 + 1400}  # tokens: image (target + refs) + text


def time_cuda(fn, repeats: int = 5) -> float:
    """Median seconds of `fn()` on the GPU, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def attention_backends_table() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    compiled = torch.compile(sdpa)
    print("| shape | tokens | backend | eager fwd+bwd ms | TFLOP/s | compiled fwd+bwd ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for shape, tokens in SHAPES.items():
        q, k, v = (
            torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        flops = 4 * tokens**2 * HEADS * HEAD_DIM * 3.5
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            cells = []
            for fn in (sdpa, compiled):
                try:
                    with sdpa_kernel([backend]):
                        seconds = time_cuda(lambda fn=fn, q=q, k=k, v=v, grad=grad: fn(q, k, v).backward(grad))
                    cells += [f"{seconds * 1e3:.2f}", f"{flops / seconds / 1e12:.0f}"]
                except RuntimeError as err:
                    cells += [f"fails ({str(err).splitlines()[0][:40]})", ""]
                torch._dynamo.reset()
            print(f"| {shape} | {tokens} | {backend.name} | " + " | ".join(cells) + " |")


def block_profile(tokens_image: int, tokens_text: int) -> None:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenImageTransformerBlock

    from train.attention import attention_backends

    torch.manual_seed(0)
    block = QwenImageTransformerBlock(dim=HEADS * HEAD_DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    block = block.to("cuda", torch.bfloat16).requires_grad_(False)
    # A LoRA-like trainable leaf so backward runs through every layer as in training.
    image = torch.randn(1, tokens_image, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    text = torch.randn(1, tokens_text, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    temb = torch.randn(1, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    side = 64  # a 1024² image is 64 x 64 latent patches
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True).to("cuda")
    frames = [(1, side, side)] * (tokens_image // side**2)  # target, then each reference
    image_rope, text_rope = rope([frames], device=torch.device("cuda"), max_txt_seq_len=tokens_text)
    forward = torch.compile(block.forward)

    def step():
        text_out, image_out = forward(
            hidden_states=image,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            temb=temb,
            image_rotary_emb=(image_rope, text_rope),
        )
        (image_out.float().square().mean() + text_out.float().square().mean()).backward()

    with attention_backends(True):
        seconds = time_cuda(step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    print(f"\none compiled block, {tokens_image} image + {tokens_text} text tokens: {seconds * 1e3:.1f} ms fwd+bwd")
    groups: dict[str, float] = {}
    rows = []
    for event in prof.key_averages():
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if us <= 0:
            continue
        name = event.key
        low = name.lower()
        group = (
            "attention"
            if any(s in low for s in ("flash", "fmha", "cudnn", "attention", "sdpa"))
            else "matmul"
            if any(s in low for s in ("gemm", "sm90", "cutlass", "matmul", "nvjet"))
            else "other"
        )
        groups[group] = groups.get(group, 0.0) + us
        rows.append((us, group, name))
    total = sum(groups.values())
    print("| group | ms | share |\n|---|---|---|")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {us / 1e3:.2f} | {us / total:.0%} |")
    print("\ntop kernels:")
    for us, group, name in sorted(rows, reverse=True)[:12]:
        print(f"  {us / 1e3:8.2f} ms  {group:9s} {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-profile", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    attention_backends_table()
    if not args.skip_profile:
        block_profile(4096 * 2, 1400)
        block_profile(4096 * 4, 1400)


if __name__ == "__main__":
    main()
