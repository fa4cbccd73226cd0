"""The training policy: one value, parsed once, that says what trains, when, and how fast.

A `Policy` answers every question the rest of the toolkit asks about freezing:

  trainable_modules(model, steps_done)  which modules train now (None: ever, in this run)
  stage(model, steps_done) / schedule()  gradual unfreezing: the static policy in force after
                                         `steps_done` optimizer steps, and when each thaw happens
  param_groups(model, lr, weight_decay)  the optimizer's groups: layer-wise lr decay (LLRD) and
                                         no weight decay for biases and norms
  frozen_prefix(model)                  the part that never trains (frozen dropout, --cache-frozen)
  export(model)                         the module to save as `model/`

Spelling (one grammar for `compare --policies`; `train` takes the same pieces as flags):

  none | head | lastN                    static (`--freeze`)
  lora                                   LoRA adapters + head + pooler (`--freeze lora`, settings from
                                         the --lora-* flags, see toolkit/policy/lora.py); static, no LLRD
  START>TARGET@N                         gradual: START, then every N optimizer steps the next
                                         block from the top thaws (the pooler with the first)
                                         until TARGET (`--unfreeze-every N --unfreeze-to TARGET`)
  ...+llrdF                              layer-wise lr decay F (`--layer-lr-decay F`)

e.g. `last2+llrd0.9`, `head>none@50`, `head>none@50+llrd0.8`.

Depth levels order the static policies: head (0) < last1 (1) < ... < lastL (L) < none (L+1);
a gradual schedule climbs one level per thaw.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from torch import nn

from ..core.errors import ToolkitError
from . import lora as lora_lib
from .blocks import POST_BLOCK_MODULES, FreezeSummary, find_blocks, head_modules, summarize
from .lora import LoraSpec


@dataclass(frozen=True)
class Policy:
    kind: str  # "none" | "last" | "head" | "lora"
    blocks: int = 0  # N of lastN
    layer_lr_decay: float = 1.0  # F of LLRD; 1 = every group gets --lr
    unfreeze_every: int = 0  # optimizer steps between thaws; 0 = static
    unfreeze_to: "Policy | None" = None  # the static policy a gradual schedule ends at
    lora: LoraSpec | None = None  # kind "lora": rank, alpha, dropout, targets

    # ------------------------------------------------------------------ spelling

    @classmethod
    def parse(cls, text: str) -> "Policy":
        """The full spelling: START[>TARGET@N][+llrdF] (see the module docstring)."""
        rest, llrd = text.strip(), 1.0
        if "+" in rest:
            rest, _, suffix = rest.partition("+")
            match = re.fullmatch(r"llrd(\d*\.?\d+(?:e-?\d+)?)", suffix)
            if not match:
                raise ToolkitError(f"unknown policy suffix '+{suffix}' in '{text}'",
                                   "spell LLRD as +llrdF, e.g. last2+llrd0.9")
            llrd = float(match.group(1))
        every, target = 0, None
        if ">" in rest:
            rest, _, gradual = rest.partition(">")
            match = re.fullmatch(r"([a-z0-9]+)@(\d+)", gradual)
            if not match:
                raise ToolkitError(f"cannot read the gradual schedule '>{gradual}' in '{text}'",
                                   "spell it START>TARGET@N, e.g. head>none@50 (thaw one block every 50 steps)")
            target, every = match.group(1), int(match.group(2))
            if every == 0:
                raise ToolkitError(f"'{text}' thaws every 0 steps", "use @N with N >= 1, e.g. head>none@50")
        return cls.build(rest, llrd, every, target)

    @classmethod
    def from_config(cls, cfg) -> "Policy":
        """From train's flags: --freeze, --layer-lr-decay, --unfreeze-every, --unfreeze-to."""
        if any(c in cfg.freeze for c in "+>@"):
            raise ToolkitError(f"--freeze takes none, head, lora or lastN, not '{cfg.freeze}'",
                               "use the flags: --layer-lr-decay F, --unfreeze-every N --unfreeze-to POLICY "
                               "(the combined spelling is for compare --policies)")
        if cfg.unfreeze_to is not None and not cfg.unfreeze_every:
            raise ToolkitError(f"--unfreeze-to {cfg.unfreeze_to} without --unfreeze-every",
                               "add --unfreeze-every N (thaw one block every N optimizer steps), or drop --unfreeze-to")
        if cfg.unfreeze_every < 0:
            raise ToolkitError(f"--unfreeze-every {cfg.unfreeze_every} is negative",
                               "use N >= 1, or 0 for no unfreezing")
        policy = cls.build(cfg.freeze, cfg.layer_lr_decay, cfg.unfreeze_every,
                           (cfg.unfreeze_to or "none") if cfg.unfreeze_every else None)
        return replace(policy, lora=LoraSpec.from_config(cfg)) if policy.kind == "lora" else policy

    @classmethod
    def build(cls, start: str, layer_lr_decay: float = 1.0, unfreeze_every: int = 0,
              unfreeze_to: str | None = None) -> "Policy":
        """Every check that needs no model; the two parsers above end here."""
        policy = _parse_static(start)
        if "lora" in (policy.kind, unfreeze_to) and (unfreeze_every or layer_lr_decay != 1):
            raise ToolkitError("LoRA combines with neither gradual unfreezing nor layer-wise lr decay: it trains "
                               "adapters in every block from the first step",
                               "use --freeze lora alone (its settings are the --lora-* flags), or another policy "
                               "with --unfreeze-every / --layer-lr-decay")
        if not 0 < layer_lr_decay <= 1:
            raise ToolkitError(f"--layer-lr-decay {layer_lr_decay:g} is outside (0, 1]",
                               "use a factor in (0, 1], e.g. 0.9 (1 turns layer-wise decay off)")
        if unfreeze_every:
            if policy.kind == "none":
                raise ToolkitError("gradual unfreezing needs a start policy that freezes something, but the start is "
                                   "'none'",
                                   "start from --freeze head or lastN (e.g. --freeze head --unfreeze-every 50)")
            target = _parse_static(unfreeze_to or "none")
            if not _below(policy, target):
                raise ToolkitError(f"the unfreeze target '{target.spec}' does not train more than the start "
                                   f"'{policy.spec}'",
                                   "pick a target above the start: head < last1 < last2 < ... < none "
                                   "(e.g. --freeze head --unfreeze-to none)")
            policy = replace(policy, unfreeze_every=unfreeze_every, unfreeze_to=target)
        if layer_lr_decay != 1:
            if (policy.unfreeze_to or policy).kind == "head":
                raise ToolkitError(f"--layer-lr-decay {layer_lr_decay:g} with '{policy.spec}': the head alone has no "
                                   "blocks to decay",
                                   "use it with --freeze none or lastN (or a gradual target above head)")
            policy = replace(policy, layer_lr_decay=layer_lr_decay)
        return policy

    @property
    def spec(self) -> str:
        """The canonical spelling: Policy.parse(p.spec) == p."""
        text = "last%d" % self.blocks if self.kind == "last" else self.kind
        if self.gradual:
            text += f">{self.unfreeze_to.spec}@{self.unfreeze_every}"
        if self.layer_lr_decay != 1:
            text += f"+llrd{self.layer_lr_decay:g}"
        return text

    @property
    def slug(self) -> str:
        """The spelling as a folder name a shell does not misread ('>' redirects)."""
        return self.spec.replace(">", "-to-").replace("@", "-every-")

    def __str__(self) -> str:
        return self.spec

    def record(self) -> dict:
        """What a checkpoint stores so that a resumed run can be checked to continue this same policy
        (the spelling alone does not name the LoRA settings, and the saved adapters have their shapes)."""
        return {"spec": self.spec, "lora": asdict(self.lora) if self.lora else None}

    @staticmethod
    def describe_record(record: dict) -> str:
        lora = record.get("lora")
        if not lora:
            return f"'{record['spec']}'"
        return (f"'{record['spec']}' (LoRA r={lora['r']}, alpha={lora['alpha']:g}, dropout={lora['dropout']:g}, "
                f"targets={lora['targets'] or 'default'})")

    @classmethod
    def of(cls, policy: "Policy | str") -> "Policy":
        """A parsed policy as is; a string (tests, notebooks, benchmarks) parsed with the full spelling."""
        return policy if isinstance(policy, Policy) else cls.parse(policy)

    def config_fields(self) -> dict:
        """The TrainConfig fields that spell this policy (compare builds each run's config from them)."""
        return {"freeze": replace(self, layer_lr_decay=1.0, unfreeze_every=0, unfreeze_to=None).spec,
                "layer_lr_decay": self.layer_lr_decay, "unfreeze_every": self.unfreeze_every,
                "unfreeze_to": self.unfreeze_to.spec if self.gradual else None}

    # ------------------------------------------------------------------ what trains, and when

    @property
    def gradual(self) -> bool:
        return self.unfreeze_every > 0

    @property
    def start(self) -> "Policy":
        """The static policy of step 0 (LLRD kept: it is about learning rates, not about what trains)."""
        return replace(self, unfreeze_every=0, unfreeze_to=None)

    @property
    def final(self) -> "Policy":
        """The static policy that trains everything this run ever trains."""
        return replace(self.unfreeze_to, layer_lr_decay=self.layer_lr_decay) if self.gradual else self

    def stage(self, model: nn.Module, steps_done: int) -> "Policy":
        """The static policy in force once `steps_done` optimizer steps are done."""
        if not self.gradual:
            return self
        num_blocks = _num_blocks(model)
        lo, hi = _level(self.start, num_blocks), _level(self.final, num_blocks)
        return replace(_at_level(min(lo + steps_done // self.unfreeze_every, hi), num_blocks),
                       layer_lr_decay=self.layer_lr_decay)

    def schedule(self, model: nn.Module) -> list[tuple[int, "Policy"]]:
        """(first step count, static policy) for every stage; one entry for a static policy."""
        if not self.gradual:
            return [(0, self)]
        num_blocks = _num_blocks(model)
        lo, hi = _level(self.start, num_blocks), _level(self.final, num_blocks)
        return [(k * self.unfreeze_every, self.stage(model, k * self.unfreeze_every)) for k in range(hi - lo + 1)]

    def trainable_modules(self, model: nn.Module, steps_done: int | None = None) -> dict[str, nn.Module]:
        """Qualified module name -> module, for every module trained after `steps_done` steps (None: ever)."""
        policy = self.final if steps_done is None else self.stage(model, steps_done)
        if policy.kind == "none":
            return {"": model}
        if policy.kind == "lora":  # the adapters themselves exist once apply() has wrapped the model
            return lora_lib.fully_trained_modules(lora_lib.base_of(model))
        chosen = dict(head_modules(model))
        if policy.kind == "last":
            prefix = model.base_model_prefix
            block_path, blocks = find_blocks(model)
            if policy.blocks > len(blocks):
                flag = "--unfreeze-to" if self.gradual else "--freeze"
                raise ToolkitError(
                    f"{flag} {policy.spec.split('+')[0]} asks for {policy.blocks} blocks but this model has "
                    f"{len(blocks)}",
                    f"use last1..last{len(blocks)}, or none to train everything")
            for i in range(len(blocks) - policy.blocks, len(blocks)):
                chosen[f"{prefix}.{block_path}.{i}"] = blocks[i]
            for name in POST_BLOCK_MODULES:
                module = getattr(model.base_model, name, None)
                if isinstance(module, nn.Module):
                    chosen[f"{prefix}.{name}"] = module
        return chosen

    def apply(self, model: nn.Module, steps_done: int | None = None) -> nn.Module:
        """Set requires_grad to the modules trained after `steps_done` steps (None: ever); returns the model.

        train.py applies the eventual set before wrapping (DDP registers only parameters that
        require grad, at wrap time) and the current stage right after (see set_stage).
        """
        if self.kind == "lora":  # wraps once, in peft: returns the PeftModel (LoRA A/B + head + pooler trained)
            if lora_lib.is_lora(model):
                return model
            spec = self.lora or LoraSpec()
            return lora_lib.apply_lora(model, spec.r, spec.alpha, spec.dropout, spec.targets)
        chosen = self.trainable_modules(model, steps_done)
        model.requires_grad_(False)
        for module in chosen.values():
            module.requires_grad_(True)
        return model

    def set_stage(self, model: nn.Module, steps_done: int) -> "Policy | None":
        """Gradual runs: make requires_grad follow the stage after `steps_done` steps; the stage if it changed.

        How DDP and AdamW see a thaw. The eventual trainable set is in the DDP wrap (it
        requires grad at wrap time, so DDP registers its gradient hooks) and in the
        optimizer from the start; not-yet-thawed parameters then get requires_grad=False.
        Autograd then computes no gradient for them (their backward costs nothing), DDP
        (find_unused_parameters=True, set by train.py) sees them as unused on every rank
        and leaves their .grad None, and torch's AdamW skips parameters whose .grad is None
        entirely: no moment update and no decoupled weight decay, so they stay bit-identical
        until their thaw step (tested). At the thaw the flag flips back; AdamW creates their
        state at their first real gradient (bias correction counts from there), and DDP
        all-reduces their gradients through the hooks it registered at wrap time. Because the
        stage is a function of the step count, a resumed run simply calls this again.
        Not under DeepSpeed/FSDP: they flatten parameters at wrap time and step the whole
        flat partition (check_backend refuses).
        """
        if not self.gradual:
            return None
        before = {n for n, p in model.named_parameters() if p.requires_grad}
        self.apply(model, steps_done)
        after = {n for n, p in model.named_parameters() if p.requires_grad}
        return self.stage(model, steps_done) if after != before else None

    def check_backend(self, distributed_type, zero_stage: int | None = None) -> None:
        """Refuse back-ends that cannot run this policy (before anything is written)."""
        name = str(distributed_type).rsplit(".", 1)[-1]
        if self.gradual and name in ("DEEPSPEED", "FSDP"):
            raise ToolkitError(f"gradual unfreezing ('{self.spec}') does not run under {name}: it flattens the "
                               "parameters at wrap time and steps them all, so not-yet-thawed weights would move",
                               "run it in one process or with DDP (multi_gpu.yaml / cpu_2proc.yaml), or use a "
                               "static policy (none / lastN, with --layer-lr-decay if wanted) under DeepSpeed or FSDP")

    # ------------------------------------------------------------------ optimizer

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups over the parameters that require grad (after apply(): every one this run trains).

        No weight decay for biases and normalisation weights. With LLRD (F < 1) each depth
        level is its own pair of groups: the head, pooler (and ModernBERT's final norm) get
        lr, block i of L (0-based) lr * F^(L-i), so the top block gets lr * F, and the
        embeddings (with anything else in the backbone outside the blocks) lr * F^(L+1).
        Each group carries a "name" for config.json. The schedule multiplies every group's
        lr by one factor, so the ratios hold at every step.
        """
        levels = self._lr_levels(model)
        groups: dict[str, dict] = {}
        norm_types = (nn.LayerNorm,) + tuple(t for t in (getattr(nn, "RMSNorm", None),) if t)
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                level, scale = levels(full)
                skip = (name.endswith("bias") or isinstance(module, norm_types)
                        or "norm" in type(module).__name__.lower())
                key = f"{level} {'no_decay' if skip else 'decay'}"
                group = groups.setdefault(key, {"name": key, "params": [], "lr": lr * scale,
                                                "weight_decay": 0.0 if skip else weight_decay})
                group["params"].append(p)
        if not groups:
            raise ToolkitError(f"the policy '{self.spec}' left no trainable parameters",
                               "use --freeze head, lastN or none")
        return list(groups.values())

    def _lr_levels(self, model: nn.Module):
        """parameter name -> (level name, lr multiplier)."""
        if self.layer_lr_decay == 1:
            return lambda name: ("all", 1.0)
        decay, prefix = self.layer_lr_decay, model.base_model_prefix
        block_path, blocks = find_blocks(model)
        num_blocks, block_re = len(blocks), re.compile(re.escape(f"{prefix}.{block_path}.") + r"(\d+)\.")
        top = tuple(f"{prefix}.{m}." for m in POST_BLOCK_MODULES)

        def level(name: str) -> tuple[str, float]:
            match = block_re.match(name)
            if match:
                i = int(match.group(1))
                return f"block {i}", decay ** (num_blocks - i)
            if not name.startswith(prefix + ".") or name.startswith(top):
                return "head", 1.0
            return "embeddings", decay ** (num_blocks + 1)

        return level

    # ------------------------------------------------------------------ the never-trained part, export

    def frozen_prefix(self, model: nn.Module) -> list[nn.Module]:
        """Backbone modules this run never trains, in execution order (empty when the final policy is 'none').

        lastN: the embeddings and the first L-N blocks; head: the whole backbone. Gradual runs:
        the final policy's (what thaws later is not part of it).
        """
        final = self.final
        if final.kind == "none":
            return []
        if final.kind == "lora":  # the adapted blocks run dropout (and a backward): the embeddings and blocks below
            return lora_lib.frozen_prefix(model)
        base = model.base_model
        if final.kind == "head":
            return [base]
        _, blocks = find_blocks(model)
        prefix = [m for name, m in base.named_children() if "embed" in name.lower()]
        return prefix + list(blocks[: len(blocks) - final.blocks])

    def export(self, model: nn.Module) -> nn.Module:
        """The model to save as model/: the trained model itself.

        LoRA too: checkpoint.save_model merges a peft model on the side, from the state dict it gathers
        on every rank (ZeRO-3 shards included), and writes the unmerged adapter to adapter/.
        """
        return model


def _parse_static(text: str) -> Policy:
    if text in ("none", "head"):
        return Policy(text)
    if text == "lora":
        return Policy("lora", lora=LoraSpec())
    match = re.fullmatch(r"last(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return Policy("last", int(match.group(1)))
    raise ToolkitError(f"unknown freeze policy '{text}'", "use none, head, lora, or lastN with N >= 1 (e.g. last2)")


def _below(a: Policy, b: Policy) -> bool:
    """a trains strictly less than b (static policies, any model)."""
    def key(p: Policy) -> tuple[int, int]:
        return ({"head": 0, "last": 1, "none": 2}[p.kind], p.blocks)

    return key(a) < key(b)


def _num_blocks(model: nn.Module) -> int:
    return len(find_blocks(model)[1])


def _level(policy: Policy, num_blocks: int) -> int:
    if policy.kind == "last" and policy.blocks > num_blocks:
        raise ToolkitError(f"last{policy.blocks} asks for {policy.blocks} blocks but this model has {num_blocks}",
                           f"use last1..last{num_blocks}, or none to train everything")
    return {"head": 0, "none": num_blocks + 1}.get(policy.kind, policy.blocks)


def _at_level(level: int, num_blocks: int) -> Policy:
    return Policy("head") if level == 0 else Policy("none") if level > num_blocks else Policy("last", level)


# ------------------------------------------------------------------ helpers for a model and a policy


def apply_freeze(model: nn.Module, policy) -> FreezeSummary:
    """Set requires_grad per a static policy (a Policy, or its spelling) and summarise the result per group."""
    policy = Policy.of(policy)
    policy.apply(model)
    return summarize(model, policy.spec)


def disable_frozen_dropout(model: nn.Module, policy: "Policy | str") -> int:
    """Set p=0 on every dropout inside the frozen part; returns how many were changed.

    The frozen part is what the run never trains (Policy.frozen_prefix): blocks a gradual
    schedule thaws later keep their dropout. Frozen parameters never change, but dropout still runs in
    the frozen layers in training mode: that is random-mask generation on every activation and, on
    CPU, it keeps PyTorch's scaled-dot-product attention on its slow "math" kernel (the fused kernel
    has no dropout).
    With p=0 the frozen part computes exactly what it computes in eval mode. train.py does this
    by default (--frozen-dropout keeps the seeds' behaviour); measured F1 is the same within seed noise.
    The module objects are untouched, so DDP / DeepSpeed wrapping and saving are unaffected.
    """
    changed = 0
    for part in Policy.of(policy).frozen_prefix(model):
        for module in part.modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                module.p = 0.0
                changed += 1
    return changed
