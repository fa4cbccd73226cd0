"""Throughput bookkeeping: model FLOPs per batch (LoRA included), peak FLOPs per GPU, MFU.

FLOPs are counted the usual MFU way (PaLM, appendix B): matrix multiplies only, on the
*non-padding* tokens of each sequence, so padding is waste that lowers MFU, not work
that raises it. For an encoder with hidden size d, FFN size f and a sequence of n tokens:

    per block, forward:  (8 d^2 + 4 d f) n      Q, K, V, output projections + FFN
                       +  4 d n^2               Q K^T and attention x V
    pooler, forward:      2 d^2                  one vector per sequence
    head, forward:        2 x (weights of its linear layers), one vector per sequence

A trained module costs 3x its forward (forward, input gradient, weight gradient), less
the input gradients autograd skips: when nothing below a trained module is trained, its
input needs no gradient, so the first trained block skips the Q/K/V input gradients
(6 d^2 per token) and a head on a frozen backbone costs 2x. A frozen module costs 1x
(forward only: its inputs need no gradient, so autograd records nothing for it), or 0x
when its output comes from the --cache-frozen cache. Embedding lookups, layer norms,
softmax and activations are not counted. This is the count torch.utils.flop_counter
gives for a real training step (tested, with eager attention).

MFU = model FLOPs per second / (peak FLOPs of one device x number of devices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..policy import lora as lora_lib
from ..policy.blocks import find_blocks, head_modules
from ..policy.policy import Policy

# Dense peak throughput in TFLOPS per GPU (vendor data sheets; no structured sparsity).
# "fp32" is plain fp32 on CUDA cores, "tf32" the tensor-core fp32 path, "half" fp16/bf16
# tensor cores (T4 and V100 have no bf16 tensor cores: their bf16 entry is None).
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "T4": {"fp32": 8.1, "tf32": None, "fp16": 65.0, "bf16": None},
    "V100-PCIE": {"fp32": 14.0, "tf32": None, "fp16": 112.0, "bf16": None},
    "V100": {"fp32": 15.7, "tf32": None, "fp16": 125.0, "bf16": None},  # SXM2
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.0, "bf16": 835.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},  # SXM5
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.0, "bf16": 835.0},
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},  # SXM5
}


def gpu_family(device_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'Tesla V100-PCIE-16GB' -> 'V100-PCIE', unknown -> None."""
    name = device_name.upper()
    # most specific first: "H100 NVL" before "H100", "V100-PCIE" before "V100"
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        parts = key.upper().split()
        if all(p in name for p in parts):
            return key
    return None


def peak_flops(device_name: str, mixed_precision: str, allow_tf32: bool = False) -> float | None:
    """Peak FLOP/s of one GPU for a precision ('no' | 'fp16' | 'bf16'); None when unknown."""
    family = gpu_family(device_name)
    if family is None:
        return None
    table = PEAK_TFLOPS[family]
    if mixed_precision in ("fp16", "bf16"):
        tflops = table[mixed_precision]
    else:
        tflops = (table["tf32"] if allow_tf32 else None) or table["fp32"]
    return tflops * 1e12 if tflops else None


def device_peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """Peak FLOP/s of the current device; None on CPU or an unlisted GPU (then no MFU is reported)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), str(mixed_precision),
                      allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def linear_weights(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() if getattr(m, "weight", None) is not None and m.weight.dim() == 2 else 0
               for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of a batch = per_token * tokens + per_len_sq * sum(n_i^2) + per_seq * sequences."""

    per_token: float
    per_len_sq: float
    per_seq: float

    def flops(self, tokens: float, sum_len_sq: float, sequences: float) -> float:
        return self.per_token * tokens + self.per_len_sq * sum_len_sq + self.per_seq * sequences

    @classmethod
    def for_encoder(cls, hidden: int, ffn: int, layers: int, trainable_layers: int, pooler_weights: int,
                    pooler_trained: bool, head_weights: int, embeddings_trained: bool = False,
                    cached_prefix: bool = False) -> "FlopModel":
        """The count of the module docstring; the last `trainable_layers` blocks are trained."""
        d = hidden
        frozen = layers - trainable_layers
        frozen_mult = 0 if cached_prefix else 1
        layer_mults = frozen * frozen_mult + 3 * trainable_layers
        per_token = layer_mults * (8 * d * d + 4 * d * ffn)
        if trainable_layers and not embeddings_trained:
            per_token -= 6 * d * d  # the first trained block's input needs no gradient: no Q/K/V input gradients
        grad_below = embeddings_trained or trainable_layers > 0
        pooler_mult = (3 if grad_below else 2) if pooler_trained else frozen_mult
        head_mult = 3 if grad_below or pooler_trained else 2
        return cls(per_token=per_token, per_len_sq=layer_mults * 4 * d,
                   per_seq=pooler_mult * 2 * pooler_weights + head_mult * 2 * head_weights)

    @classmethod
    def from_model(cls, model: nn.Module, policy: "Policy | str", cached_prefix: bool = False) -> "FlopModel | None":
        """For BERT-like encoders (hidden_size / intermediate_size / num_hidden_layers); None otherwise.

        `policy` is a static policy: for a gradual run, the stage in force (train.py swaps the
        count at every thaw, see CurrentFlops).
        """
        cfg = getattr(model, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "hidden_dim", None)
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None)
        if not (hidden and ffn and layers):
            return None
        policy = Policy.of(policy)
        if policy.kind == "lora":  # its adapted blocks run a backward through frozen weights, plus its own matmuls
            return lora_flop_model(model, policy.lora.r, policy.lora.targets)
        kind, n = policy.kind, policy.blocks
        trainable_layers = {"none": layers, "head": 0}.get(kind, min(n, layers))
        base = getattr(model, "base_model", model)
        pooler = getattr(base, "pooler", None)
        head = [m for name, m in model.named_children() if name != getattr(model, "base_model_prefix", None)]
        return cls.for_encoder(hidden, ffn, layers, trainable_layers, linear_weights(pooler), kind != "head",
                               sum(linear_weights(m) for m in head), embeddings_trained=kind == "none",
                               cached_prefix=cached_prefix)

    @classmethod
    def for_lora(cls, hidden: int, ffn: int, adapters: list[dict[str, int]], pooler_weights: int,
                 head_weights: int) -> "FlopModel":
        """LoRA: every base weight frozen, `adapters[i]` = {role: rank} for block i, pooler and head trained.

        Roles: 'q', 'k', 'v', 'o' (hidden x hidden), 'qkv' (fused, hidden x 3 hidden), 'ffn_in', 'ffn_out';
        any other adapted layer ('other') is counted as a hidden x hidden projection at the block's input.
        A frozen weight whose input needs a gradient costs 2x (forward + input gradient): from the lowest
        adapted projection up, the activation gradients run through every frozen matmul above it. An
        adapter x -> A (r) -> B costs 3 x 2 r (d_in + d_out), less the input gradient 2 r d_in when x needs
        none. The attention matmuls cost their forward plus one gradient per operand that needs one.
        """
        d, f = hidden, ffn
        per_token = per_len_sq = 0
        x_grad = False  # does the block's input need a gradient (is anything below it trained)?

        def linear(d_in: int, d_out: int, needs: bool, r: int) -> tuple[int, bool]:
            cost = 2 * d_in * d_out * (2 if needs else 1)
            if r:
                cost += 3 * 2 * r * (d_in + d_out) - (0 if needs else 2 * r * d_in)
            return cost, needs or r > 0

        for lora in adapters:
            cost = 0
            x_in = x_grad or lora.get("other", 0) > 0
            if "other" in lora:
                cost += 3 * 2 * lora["other"] * (d + d)
            if "qkv" in lora:
                c, q_grad = linear(d, 3 * d, x_in, lora["qkv"])
                k_grad = v_grad = q_grad
                cost += c
            else:
                (cq, q_grad), (ck, k_grad), (cv, v_grad) = (linear(d, d, x_in, lora.get(role, 0)) for role in "qkv")
                cost += cq + ck + cv
            scores_grad = q_grad or k_grad
            per_len_sq += (4 + 2 * q_grad + 2 * k_grad + 2 * scores_grad + 2 * v_grad) * d
            co, o_grad = linear(d, d, scores_grad or v_grad, lora.get("o", 0))
            mid_grad = o_grad or x_in  # the residual carries the block input's gradient too
            ci, i_grad = linear(d, f, mid_grad, lora.get("ffn_in", 0))
            cf, out_grad = linear(f, d, i_grad, lora.get("ffn_out", 0))
            per_token += cost + co + ci + cf
            x_grad = out_grad or mid_grad
        pooler_mult = 3 if x_grad else 2
        head_mult = 3 if x_grad or pooler_weights else 2
        return cls(per_token=per_token, per_len_sq=per_len_sq,
                   per_seq=pooler_mult * 2 * pooler_weights + head_mult * 2 * head_weights)


def batch_stats(attention_mask: torch.Tensor) -> torch.Tensor:
    """[real tokens, padded tokens, sum of squared lengths, sequences] of one batch, as int64 on its device."""
    lengths = attention_mask.sum(dim=1, dtype=torch.int64)
    total = lengths.sum()
    # full_like fills on the device; torch.tensor(n, device=cuda) would be a blocking host-to-device copy per batch
    return torch.stack([total, torch.full_like(total, attention_mask.numel()),
                        (lengths * lengths).sum(), torch.full_like(total, lengths.numel())])


class CurrentFlops:
    """The FLOP count of the trainable set in force: gradual unfreezing swaps `model` at every thaw."""

    def __init__(self, model: FlopModel | None):
        self.model = model

    def __bool__(self) -> bool:
        return self.model is not None

    def flops(self, tokens: int, len_sq: int, seqs: int) -> float:
        return self.model.flops(tokens, len_sq, seqs) if self.model else 0.0


def lora_flop_model(model: nn.Module, r: int, targets: str | None = None):
    """Training FLOPs per batch of a LoRA model (FlopModel.for_lora), plain or wrapped; None if not BERT-like."""
    model = lora_lib.base_of(model)
    resolved = lora_lib.resolve_targets(model, targets)
    cfg = model.config
    hidden = lora_lib.hidden_size(model)
    ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "hidden_dim", None)
    if not (hidden and ffn):
        return None
    block_path, blocks = find_blocks(model)
    lead = f"{model.base_model_prefix}.{block_path}."
    adapters: list[dict[str, int]] = [{} for _ in blocks]
    for name, role in resolved.items():
        block = adapters[int(name[len(lead):].split(".")[0])]
        block[role] = block.get(role, 0) + r
    pooler = getattr(model.base_model, "pooler", None)
    head = sum(linear_weights(m) for m in head_modules(model).values())
    return FlopModel.for_lora(hidden, ffn, adapters, linear_weights(pooler), head)

