"""loraflow.cpu_kernels against what torch does for the same operation, one operation at a time:
forward + backward, bf16, the shapes of a DialoGPT-small/512 training row, alternating in one
process, medians.

  dropout    [512, 3072] at p = 0.05 (a LoRA input): torch's F.dropout | loraflow.dropout's kernel
  attention  one layer, 12 heads x 512 tokens, causal, attention dropout 0.1: SDPA (its math kernel,
             where torch goes with dropout on a CPU) | loraflow.dropout.attention (query blocks, the
             fused softmax + mask kernel, its own backward)
  loss       256 positions x 50,257 logits: log-softmax in fp32 + NLL and its gradient, as the
             unfused head computes it | the cross-entropy kernel (loss and softmax - onehot, one pass)
  gelu       [512, 3072], tanh form: torch's one-kernel GELU | the GELU kernel

    .venv/bin/python bench/cpu_kernels_ab.py --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from loraflow import cpu_kernels, dropout

    fused = cpu_kernels.kernels()
    if fused is None:
        raise SystemExit(cpu_kernels.status())
    torch.manual_seed(0)
    bf16 = torch.bfloat16

    def grad_of(x):
        return x.detach().requires_grad_()

    x = torch.randn(512, 3072, dtype=bf16)
    q, k, v = (torch.randn(1, 12, 512, 64, dtype=bf16) for _ in range(3))
    h = torch.randn(256, 768, dtype=bf16)
    w = torch.randn(50257, 768, dtype=bf16) * 0.02
    y = torch.randint(0, 50257, (256,))

    class Layer:
        is_causal = True

    def torch_dropout():
        a = grad_of(x)
        F.dropout(a, 0.05, True).sum().backward()

    def our_dropout():
        a = grad_of(x)
        dropout.cpu_dropout(a, 0.05).sum().backward()

    def sdpa():
        a, b, c = grad_of(q), grad_of(k), grad_of(v)
        F.scaled_dot_product_attention(a, b, c, dropout_p=0.1, is_causal=True).sum().backward()

    def our_attention():
        a, b, c = grad_of(q), grad_of(k), grad_of(v)
        dropout.attention(Layer(), a, b, c, None, dropout=0.1)[0].sum().backward()

    def torch_loss():
        logits = (h @ w.T).float()
        logp = torch.log_softmax(logits, dim=-1)
        loss = -logp.gather(1, y[:, None]).sum()
        g = logp.exp_()
        g[torch.arange(256), y] -= 1.0
        return loss, g.to(bf16) @ w

    def our_loss():
        logits = h @ w.T
        loss = fused.cross_entropy_(logits, y).sum()
        return loss, logits @ w

    def torch_gelu():
        a = grad_of(x)
        F.gelu(a, approximate="tanh").sum().backward()

    def our_gelu():
        from loraflow.activations import CpuGELUTanh

        a = grad_of(x)
        CpuGELUTanh()(a).sum().backward()

    pairs = {"dropout": (torch_dropout, our_dropout), "attention": (sdpa, our_attention),
             "loss": (torch_loss, our_loss), "gelu": (torch_gelu, our_gelu)}
    times = {name: ([], []) for name in pairs}
    for r in range(args.rounds + 1):
        for name, fns in pairs.items():
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                t = time.perf_counter()
                fns[i]()
                if r:  # the first round warms up
                    times[name][i].append(time.perf_counter() - t)
    print(f"loraflow.cpu_kernels vs torch, bf16, forward + backward, median of {args.rounds} alternating rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'operation':<12}{'torch ms':>10}{'loraflow ms':>13}{'speed-up':>10}")
    for name, (theirs, ours) in times.items():
        a, b = statistics.median(theirs) * 1e3, statistics.median(ours) * 1e3
        print(f"{name:<12}{a:>10.2f}{b:>13.2f}{a / b:>9.2f}x")


if __name__ == "__main__":
    main()
