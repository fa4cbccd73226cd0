"""The model's block structure, found from its modules, and the per-group trainable table.

What the static policies select (policy.py parses them and adds LLRD and gradual unfreezing):
  none   train every parameter.
  lastN  train the last N encoder blocks, what runs after them (BERT's pooler,
         ModernBERT's final norm) and the task head.
  head   train the task head only (BERT's pretrained pooler stays frozen).

"Task head" means every module outside the pretrained backbone (`model.base_model`):
BERT's `classifier`, RoBERTa's classification head, DistilBERT's `pre_classifier` +
`classifier`, DeBERTa's context pooler + classifier, ModernBERT's `head` + `classifier`.
Selection is by module, never by parameter index or shape, so it is the same under
ZeRO-3 (which partitions parameters to shape [0]) and across architectures.

Apply the policy before `accelerator.prepare`: DDP, DeepSpeed and FSDP read
`requires_grad` when they wrap the model and build optimizer state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..core.errors import ToolkitError

# Backbone children that run after the last block and feed the head.
POST_BLOCK_MODULES = ("pooler", "final_norm")


@dataclass
class FreezeSummary:
    policy: str
    groups: list[tuple[str, int, int]]  # (group name, trainable, total)
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The backbone's list of transformer blocks: its longest ModuleList of one block type."""
    backbone = model.base_model
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ToolkitError(
            f"{type(model).__name__} has no list of encoder blocks (nn.ModuleList) in its backbone, so lastN cannot be "
            "applied",
            "use --freeze none or --freeze head for this model",
        )
    return best


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level modules outside the backbone (the randomly initialised task head)."""
    prefix = model.base_model_prefix
    return {name: m for name, m in model.named_children() if name != prefix and any(True for _ in m.parameters())}


def _group(name: str, block_path: str | None) -> str:
    """Group label for a parameter name: 'embeddings', 'block 11', 'pooler', 'classifier', ..."""
    if block_path:
        match = re.search(re.escape(block_path) + r"\.(\d+)\.", name)
        if match:
            return f"block {match.group(1)}"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else parts[0]


def summarize(model: nn.Module, policy: str) -> FreezeSummary:
    if type(model).__module__.startswith("peft."):  # LoRA: group by the classifier's own names (block i, pooler, ...)
        model = model.get_base_model()
    try:
        block_path = find_blocks(model)[0]
    except ToolkitError:
        block_path = None
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 may already hold a [0]-shaped shard
        g = groups.setdefault(_group(name, block_path), [0, 0])
        g[0] += numel if p.requires_grad else 0
        g[1] += numel
    trainable = sum(v[0] for v in groups.values())
    total = sum(v[1] for v in groups.values())
    return FreezeSummary(policy, [(k, v[0], v[1]) for k, v in groups.items()], trainable, total)
