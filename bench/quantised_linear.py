"""One frozen int8 linear layer of the real transformer, forward and input gradient: quanto's QLinear against
`train.quantised_linear.DequantisingQLinear`, eager and compiled, on the GPU.

    python bench/quantised_linear.py            # the block's widest layers at edit-v1's 1024² token count

Reports ms per forward + backward (median of 20 after 5 warm-up) and checks that the eager forward equals
quanto's CUDA operator bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layer(in_features: int, out_features: int, dequantising: bool) -> torch.nn.Module:
    from optimum.quanto import freeze, qint8, quantize

    from train.quantised_linear import use_dequantising_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features)).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(model[0].weight, std=0.02)
    quantize(model, weights=qint8)
    freeze(model)
    model.requires_grad_(False)
    if dequantising:
        use_dequantising_linears(model)
    return model


def time_ms(function, x: torch.Tensor, steps: int = 20) -> float:
    times = []
    for i in range(5 + steps):
        x.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        function(x).sum().backward()
        torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="edit-v1 at 1024²: 4096 target + 4096 reference")
    args = parser.parse_args()
    shapes = [(3072, 3072), (3072, 12288), (12288, 3072)]  # attention projections, MLP up, MLP down
    for in_features, out_features in shapes:
        x = torch.randn(1, args.tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        quanto, ours = layer(in_features, out_features, False), layer(in_features, out_features, True)
        with torch.no_grad():
            equal = torch.equal(quanto(x), ours(x))
        row = {"shape": f"[{args.tokens}, {in_features}] @ int8 [{out_features}, {in_features}]", "bit-equal": equal}
        for name, model in (("quanto", quanto), ("ours", ours)):
            row[f"{name} eager ms"] = round(time_ms(model, x), 3)
            torch._dynamo.reset()
            row[f"{name} compiled ms"] = round(time_ms(torch.compile(model, fullgraph=True), x), 3)
        print(row, flush=True)


if __name__ == "__main__":
    main()
