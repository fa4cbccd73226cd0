"""LoRA through `peft`: targets found by module structure, an explicitly trained head, two exports.

Targets. By default LoRA adapts the attention query and value projections of every encoder
block (Hu et al. 2021, section 7.1). They are found by structure, not by name: in each block
the self-attention's query, key and value are the first three Linear layers that map the
hidden size onto itself, siblings under one parent, registered in that order (BERT's
`query/key/value`, DistilBERT's `q_lin/k_lin/v_lin`, DeBERTa-v2's `query_proj/key_proj/value_proj`).
ModernBERT has one fused projection `Wqkv` (hidden -> 3 x hidden) instead: LoRA then adapts the
fused projection as a whole, so its update also reaches the keys. It has the same number of
LoRA parameters per block as query + value apart, r x (d + 3d) = 2 x r x (d + d).
`--lora-targets a,b` names others instead: module-name suffixes inside the blocks
(e.g. `attention.self.query,attention.output.dense`, or `layer.5.output.dense` for one block); each must
match at least one Linear layer.

Trained. peft marks only `lora_A`/`lora_B` trainable. The task head (every module outside
`base_model`, see blocks.head_modules) and the modules after the blocks (BERT's pooler,
ModernBERT's final norm) are then set trainable here, by module, never by peft's
`modules_to_save` name guess (which looks for `classifier`/`score` and misses DistilBERT's
`pre_classifier` or a pretrained pooler).

Exported. `model/` is the adapter merged into the weights: a plain `save_pretrained` folder that
`pipeline("text-classification")` loads without peft. `adapter/` is peft's unmerged adapter
(`adapter_config.json`, `adapter_model.safetensors`) plus `head.safetensors` (head and pooler,
which peft does not save) and the classifier's `config.json`; `load_adapter` puts them back
together on the base model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import ToolkitError
from .blocks import POST_BLOCK_MODULES, find_blocks, head_modules

HEAD_FILE = "head.safetensors"


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ToolkitError("--freeze lora needs the peft library, which is not installed",
                           'pip install -e ".[peft]" (or pip install "peft>=0.10")') from exc
    return peft


def check_options(r: int, alpha: float, dropout: float) -> None:
    if r < 1:
        raise ToolkitError(f"--lora-r {r}: the LoRA rank must be at least 1", "use e.g. --lora-r 8 (the default)")
    if alpha <= 0:
        raise ToolkitError(f"--lora-alpha {alpha}: the LoRA scale must be positive",
                           "use e.g. --lora-alpha 16 (the default)")
    if not 0 <= dropout < 1:
        raise ToolkitError(f"--lora-dropout {dropout} is outside [0, 1)",
                           "use e.g. --lora-dropout 0.1 (the default), or 0 for none")


@dataclass(frozen=True)
class LoraSpec:
    """The --lora-* settings: the LoRA part of a Policy (toolkit/policy/policy.py)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: str | None = None  # None: every block's query and value projections

    def __post_init__(self) -> None:
        check_options(self.r, self.alpha, self.dropout)

    @classmethod
    def from_config(cls, cfg) -> "LoraSpec":
        return cls(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


def base_of(model: nn.Module) -> nn.Module:
    """The transformers classifier inside a peft model (the model itself otherwise)."""
    return model.get_base_model() if is_lora(model) else model


def _linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Name -> Linear layer in a block; a peft LoRA layer counts as its base Linear (its insides are skipped)."""
    found: dict[str, nn.Linear] = {}
    inside = None
    for name, module in block.named_modules():
        if inside and name.startswith(inside):
            continue
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear):
            found[name], inside = base, name + "."
        elif isinstance(module, nn.Linear):
            found[name] = module
    return found


def hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)


def attention_projections(block: nn.Module, hidden: int) -> dict[str, str]:
    """Role ('q', 'k', 'v', or 'qkv' for a fused projection) -> module name inside one block."""
    linears = list(_linear_layers(block).items())
    fused = [n for n, m in linears if m.in_features == hidden and m.out_features == 3 * hidden]
    if fused:
        return {"qkv": fused[0]}
    square = [n for n, m in linears if m.in_features == m.out_features == hidden][:3]
    if len(square) == 3 and len({n.rpartition(".")[0] for n in square}) == 1:
        return dict(zip(("q", "k", "v"), square))
    raise ToolkitError(
        f"could not find the attention query/key/value projections in {type(block).__name__} by structure",
        f"name the layers to adapt with --lora-targets (Linear layers in a block: {', '.join(n for n, _ in linears)})")


def resolve_targets(model: nn.Module, targets: str | None = None) -> dict[str, str]:
    """Full module name -> role ('q', 'k', 'v', 'qkv', 'o', 'ffn_in', 'ffn_out' or 'other') of every LoRA target.

    `targets` None: the query and value projections of every block (the fused qkv for ModernBERT).
    Otherwise comma-separated module-name suffixes, matched against the Linear layers of the blocks.
    Works on the plain classifier and on its peft wrapping alike (the names are the plain model's).
    """
    model = base_of(model)
    prefix = model.base_model_prefix
    block_path, blocks = find_blocks(model)
    hidden = hidden_size(model)
    cfg = model.config
    ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "hidden_dim", None)
    wanted = None if targets is None else [t.strip() for t in targets.split(",") if t.strip()]
    if wanted is not None and not wanted:
        raise ToolkitError("--lora-targets is empty",
                           "name module suffixes, e.g. --lora-targets query,value, or leave it out")
    resolved: dict[str, str] = {}
    used: set[str] = set()
    for i, block in enumerate(blocks):
        base = f"{prefix}.{block_path}.{i}"
        try:
            attention = {v: k for k, v in attention_projections(block, hidden).items()}
        except ToolkitError:
            if wanted is None:
                raise
            attention = {}
        if wanted is None:
            for name, role in attention.items():
                if role in ("q", "v", "qkv"):
                    resolved[f"{base}.{name}"] = role
            continue
        linears = _linear_layers(block)
        for name, module in block.named_modules():
            if ".lora_" in name or name.endswith(".base_layer"):
                continue  # inside a peft LoRA layer
            module = linears.get(name, module)
            hits = [t for t in wanted if name == t or f"{base}.{name}".endswith("." + t)]
            if not hits:
                continue
            if not isinstance(module, nn.Linear):
                raise ToolkitError(f"--lora-targets {hits[0]} matches {base}.{name}, a {type(module).__name__}, not a "
                                   "Linear layer",
                                   f"name Linear layers (in a block: {', '.join(_linear_names(block))})")
            used.update(hits)
            shape = (module.in_features, module.out_features)
            resolved[f"{base}.{name}"] = attention.get(name) or (
                "o" if shape == (hidden, hidden) else "ffn_in" if shape == (hidden, ffn) else
                "ffn_out" if shape == (ffn, hidden) else "other")
    if wanted is not None and (unmatched := [t for t in wanted if t not in used]):
        raise ToolkitError(f"--lora-targets {', '.join(unmatched)} matches no module in the encoder blocks",
                           f"use suffixes of the Linear layers in a block: {', '.join(_linear_names(blocks[0]))}")
    return resolved


def _linear_names(block: nn.Module) -> list[str]:
    return list(_linear_layers(block))


def fully_trained_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The head and what runs after the blocks (pooler, final norm): trained in full next to the adapters."""
    chosen = dict(head_modules(model))
    for name in POST_BLOCK_MODULES:
        module = getattr(model.base_model, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            chosen[f"{model.base_model_prefix}.{name}"] = module
    return chosen


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: str | None = None):
    """Wrap a transformers classifier in a peft LoRA model; returns the PeftModel (call before accelerator.prepare)."""
    check_options(r, alpha, dropout)
    peft = _peft()
    resolved = resolve_targets(model, targets)
    trained = fully_trained_modules(model)
    # No task_type: peft's SEQ_CLS wrapper would add modules_to_save by name ("classifier", "score").
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(resolved), bias="none")
    wrapped = peft.get_peft_model(model, config)
    for module in trained.values():
        module.requires_grad_(True)
    return wrapped


def is_lora(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def adapted_modules(model: nn.Module) -> list[str]:
    """Names (in the plain classifier) of the layers a peft model adapts."""
    return sorted(name for name, m in base_of(model).named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def frozen_prefix(model: nn.Module) -> list[nn.Module]:
    """What runs before the lowest adapter: the embeddings and the blocks below it (nothing there needs a gradient)."""
    plain = base_of(model)
    block_path, blocks = find_blocks(plain)
    lead = f"{plain.base_model_prefix}.{block_path}."
    adapted = [int(n[len(lead):].split(".")[0]) for n in adapted_modules(plain) if n.startswith(lead)]
    embeddings = [m for name, m in plain.base_model.named_children() if "embed" in name.lower()]
    return embeddings + list(blocks[: min(adapted, default=0)])


def trained_head_state(peft_model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Head + pooler weights under the plain model's names ("classifier.weight", "bert.pooler.dense.weight")."""
    base = peft_model.get_base_model()
    names = {f"{prefix}.{n}" if prefix else n
             for prefix, m in fully_trained_modules(base).items() for n in m.state_dict()}
    full = state_dict if state_dict is not None else peft_model.state_dict()
    lead = "base_model.model."
    return {k[len(lead):]: v.detach().cpu().contiguous()
            for k, v in full.items() if k.startswith(lead) and k[len(lead):] in names}


def merged_model(peft_model, state_dict: dict[str, torch.Tensor] | None = None):
    """A plain transformers classifier with the adapter merged into its weights (peft's merge_and_unload).

    Built on the side from `state_dict` (the full PeftModel state, e.g. gathered from ZeRO-3 shards), so the
    trained model itself is left as it is.
    """
    peft = _peft()
    base = peft_model.get_base_model()
    if state_dict is None:
        state_dict = peft_model.state_dict()
    fresh = type(base)(copy.deepcopy(base.config))
    clone = peft.get_peft_model(fresh, copy.deepcopy(peft_model.peft_config["default"]))
    clone.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()})
    return clone.merge_and_unload()


def save_adapter(peft_model, target: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """peft's adapter files + head.safetensors + the classifier's config.json, into `target`."""
    peft_model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    save_file(trained_head_state(peft_model, state_dict), str(target / HEAD_FILE))
    peft_model.get_base_model().config.save_pretrained(target)


def load_adapter(folder: str | Path, base_model: str | None = None):
    """Base model + adapter/ -> the trained (unmerged) PeftModel, in eval mode.

    `base_model` defaults to the path recorded in adapter_config.json (the --model of the run).
    """
    peft = _peft()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(folder)
    base_path = base_model or json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(folder)  # the classifier's labels and head size
    base = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)
    missing = set(load_file(folder / HEAD_FILE)) - set(base.state_dict())
    if missing:
        raise ToolkitError(f"{folder / HEAD_FILE} holds weights the base model lacks: {sorted(missing)[:3]}",
                           "load the adapter onto the base model it was trained from")
    base.load_state_dict(load_file(folder / HEAD_FILE), strict=False)
    return peft.PeftModel.from_pretrained(base, folder).eval()
