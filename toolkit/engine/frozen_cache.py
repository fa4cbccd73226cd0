"""--cache-frozen: run the frozen part of the model once, then train the rest on its outputs.

With `--freeze head` every epoch pushes the same reviews through the same frozen
backbone; with `--freeze lastN` through the same frozen embeddings + first L-N blocks.
This module computes those outputs once per run, in eval mode, and stores them:

  head   the pooler output, one vector per example (d floats);
  lastN  the hidden states entering block L-N, one [tokens, d] matrix per example
         (stored unpadded, fp32: sum of tokens x d x 4 bytes, train + eval, in RAM
         on every process; refused with a clear message when that does not fit).

Training and evaluation then run the *same* model object with the frozen modules
short-circuited: the embeddings return the cached states (passed as `inputs_embeds`),
the frozen blocks return their input, and for `head` the pooler returns its cached
output. Parameters stay registered, so checkpoints and the saved model have the usual
keys and load anywhere; the short-circuits are removed before the model is saved.

What changes: the frozen part runs in eval mode, i.e. without dropout (the trained part
keeps its dropout). With dropout off in the frozen part the result is the same as the
normal path (tested). Batches are the same rows in the same order as without the cache
(the sampler sees the original token lengths), so resuming works the same way.

Distributed: each process computes a 1/world share of the rows, then all processes
gather all of them (every rank may see every row over the epochs). Not supported under
DeepSpeed ZeRO-3 (parameters are partitioned; the prefix cannot run outside the engine).
Supported models: BERT-style backbones (`embeddings` + a block list; for `head` also a
`pooler`), which covers BERT, MiniLM and friends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..backends.distributed import gather_objects
from ..core.errors import ToolkitError
from ..data.dataset import EpochBatchSampler, make_loader
from ..output.console import plain
from ..policy.blocks import find_blocks
from ..policy.policy import Policy


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the cache boundary."""


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _short_circuit(module: nn.Module, fn) -> None:
    module.forward = fn  # an instance attribute shadows the class's forward; `del` restores it


def _restore(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def _embeddings_passthrough(module: nn.Module):
    def forward(*args, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            raise RuntimeError("--cache-frozen: the model was called without cached features (inputs_embeds)")
        # The cache is fp32. Under autocast the weights stay fp32 and this is a no-op; DeepSpeed instead casts
        # the weights themselves to bf16/fp16 (no autocast), and the first block would meet fp32 inputs.
        # Looked up per call: DeepSpeed and FSDP replace or re-view the parameters after the cache is built.
        return inputs_embeds.to(next(module.parameters()).dtype)

    return forward


def _block_passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def _pooler_passthrough(hidden_states, *args, **kwargs):
    return hidden_states[:, 0]


class _Features(Dataset):
    def __init__(self, feats: list[torch.Tensor], labels: list[int]):
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict:
        return {"idx": i, "labels": self.labels[i], "feats": self.feats[i]}


class _FeatureCollator:
    """Pads cached [tokens, d] features into `inputs_embeds` + `attention_mask` (right padding, like the tokenizer)."""

    def __init__(self, pad_to_multiple_of: int | None):
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        width = max(r["feats"].shape[0] for r in rows)
        if self.multiple and width > 1:
            width = -(-width // self.multiple) * self.multiple
        dim = rows[0]["feats"].shape[1]
        x = rows[0]["feats"].new_zeros(len(rows), width, dim)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            n = r["feats"].shape[0]
            x[i, :n] = r["feats"]
            mask[i, :n] = 1
        return {"inputs_embeds": x, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows]),
                "idx": torch.tensor([r["idx"] for r in rows])}


@dataclass
class FrozenCache:
    model: nn.Module
    policy: Policy
    train_lengths: list[int]
    eval_lengths: list[int]
    train: _Features | None = None
    eval: _Features | None = None
    pad_to_multiple_of: int | None = None
    train_seconds: float = 0.0  # building the train features (counted as training time)
    eval_seconds: float = 0.0  # building the eval features
    nbytes: int = 0
    _patched: list[nn.Module] = field(default_factory=list)

    # ------------------------------------------------------------ checks and layout

    @staticmethod
    def check(model: nn.Module, policy: "Policy | str", accelerator=None) -> tuple[nn.Module, int]:
        """(boundary module whose output is cached, number of frozen blocks); raises ToolkitError if unsupported."""
        policy = Policy.of(policy)
        kind, n = policy.kind, policy.blocks
        if policy.kind == "lora":
            raise ToolkitError("--cache-frozen needs a frozen prefix, but LoRA adapts the blocks from the first one up",
                               "drop --cache-frozen for --freeze lora (or cache with --freeze head / lastN)")
        if policy.gradual:
            raise ToolkitError(f"--cache-frozen needs a static frozen prefix, but '{policy.spec}' thaws blocks during "
                               "the run", "use --cache-frozen with --freeze head or lastN without --unfreeze-every, "
                               "or drop --cache-frozen")
        if kind == "none":
            raise ToolkitError("--cache-frozen needs a frozen part, but --freeze none trains everything",
                               "use --freeze head or --freeze lastN with --cache-frozen, or drop --cache-frozen")
        if accelerator is not None and str(accelerator.distributed_type).endswith("DEEPSPEED"):
            plugin = accelerator.state.deepspeed_plugin
            if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
                raise ToolkitError("--cache-frozen does not work with DeepSpeed ZeRO-3 (partitioned parameters)",
                                   "use ZeRO-1/2 or DDP with --cache-frozen, or drop --cache-frozen")
        base = model.base_model
        embeddings = getattr(base, "embeddings", None)
        if not isinstance(embeddings, nn.Module) or getattr(model.config, "is_decoder", False):
            raise ToolkitError(f"--cache-frozen supports BERT-style encoders; "
                               f"{type(model).__name__} has no `embeddings`",
                               "drop --cache-frozen for this model")
        _, blocks = find_blocks(model)
        if kind == "head":
            pooler = getattr(base, "pooler", None)
            if not isinstance(pooler, nn.Module):
                raise ToolkitError(f"--cache-frozen with --freeze head needs a pooler feeding the head; "
                                   f"{type(model).__name__} has none",
                                   "use --freeze last1 --cache-frozen, or drop --cache-frozen")
            return pooler, len(blocks)
        frozen = len(blocks) - n
        return (blocks[frozen - 1] if frozen > 0 else embeddings), frozen

    @staticmethod
    def check_options(cache_frozen: bool, frozen_dropout: bool) -> None:
        """--cache-frozen and --frozen-dropout cannot both hold: the cache is computed without dropout."""
        if cache_frozen and frozen_dropout:
            raise ToolkitError("--cache-frozen computes the frozen part once, without dropout, so --frozen-dropout "
                               "cannot apply", "drop one of the two flags")

    @staticmethod
    def estimate_bytes(model: nn.Module, policy: "Policy | str", train_lengths: list[int],
                       eval_lengths: list[int]) -> int:
        """fp32 features held by one process: one vector per row (head) or one per token (lastN)."""
        hidden = model.config.hidden_size
        if Policy.of(policy).kind == "head":
            return (len(train_lengths) + len(eval_lengths)) * hidden * 4
        return (sum(train_lengths) + sum(eval_lengths)) * hidden * 4

    @classmethod
    def preflight(cls, accelerator, model: nn.Module, policy: "Policy | str", train_ds, eval_ds,
                  memory_share: float = 0.5) -> None:
        """Every reason --cache-frozen cannot run, raised before the run writes anything."""
        cls.check(model, policy, accelerator)
        need = cls.estimate_bytes(model, policy, list(train_ds["length"]), list(eval_ds["length"]))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # processes on this machine
        avail = _available_memory()
        if avail is not None and need * local > memory_share * avail:
            raise ToolkitError(
                f"--cache-frozen for {policy} would hold {need / 2**30:.1f} GiB of features in every process "
                f"({local} on this machine), more than {memory_share:.0%} of the {avail / 2**30:.1f} GiB available",
                "use --freeze head (one vector per review), fewer --train-samples / --eval-samples, a shorter "
                "--max-length, or drop --cache-frozen")

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, accelerator, model: nn.Module, policy: "Policy | str", train_ds, eval_ds, collator, batch_size: int,
              log=print) -> "FrozenCache":
        """Compute the frozen part's outputs for both splits (eval mode), then short-circuit the frozen modules."""
        policy = Policy.of(policy)
        cls.preflight(accelerator, model, policy, train_ds, eval_ds)
        boundary, frozen_blocks = cls.check(model, policy, accelerator)
        cache = cls(model, policy, list(train_ds["length"]), list(eval_ds["length"]),
                    pad_to_multiple_of=getattr(getattr(collator, "pad", None), "pad_to_multiple_of", None))
        model.to(accelerator.device)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        cache.train = _Features(cache._compute(accelerator, boundary, train_ds, collator, batch_size),
                                list(train_ds["labels"]))
        cache.train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        cache.eval = _Features(cache._compute(accelerator, boundary, eval_ds, collator, batch_size),
                               list(eval_ds["labels"]))
        cache.eval_seconds = time.perf_counter() - start
        model.train(was_training)
        cache.nbytes = sum(t.numel() * t.element_size() for t in cache.train.feats + cache.eval.feats)
        cache._patch(frozen_blocks)
        log(f"cache-frozen ({plain(policy)}): {len(train_ds)} + {len(eval_ds)} examples through the frozen part in "
            f"{cache.train_seconds:.1f} + {cache.eval_seconds:.1f} s, {cache.nbytes / 2**20:.1f} MiB per process")
        return cache

    @torch.no_grad()
    def _compute(self, accelerator, boundary: nn.Module, ds, collator, batch_size: int) -> list[torch.Tensor]:
        lengths = list(ds["length"])
        order = sorted(range(len(ds)), key=lambda i: -lengths[i])  # little padding
        mine = order[accelerator.process_index::accelerator.num_processes]
        head = self.policy.kind == "head"
        captured: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            captured["out"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handle = boundary.register_forward_hook(hook)
        out: list[tuple[int, torch.Tensor]] = []
        try:
            for start in range(0, len(mine), batch_size):
                rows = [dict(ds[int(i)]) for i in mine[start:start + batch_size]]
                batch = collator(rows)
                idx = batch.pop("idx").tolist()
                batch.pop("labels", None)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                try:
                    with accelerator.autocast():
                        self.model.base_model(**batch)
                except _Stop:
                    pass
                hidden = captured.pop("out").float()
                lens = batch["attention_mask"].sum(dim=1).tolist()
                for j, i in enumerate(idx):
                    feat = hidden[j:j + 1] if head else hidden[j, :lens[j]]
                    out.append((i, feat.cpu().clone()))
        finally:
            handle.remove()
        if accelerator.num_processes > 1:
            out = gather_objects(accelerator, out)  # through host memory: over NCCL it would all sit on the GPU
        feats: list[torch.Tensor | None] = [None] * len(ds)
        for i, feat in out:
            feats[i] = feat
        if any(f is None for f in feats):
            raise RuntimeError("--cache-frozen: some rows got no features")
        return feats  # type: ignore[return-value]

    # ------------------------------------------------------------ the short-circuited model

    def _patch(self, frozen_blocks: int) -> None:
        base = self.model.base_model
        _short_circuit(base.embeddings, _embeddings_passthrough(base.embeddings))
        self._patched.append(base.embeddings)
        _, blocks = find_blocks(self.model)
        for block in list(blocks)[:frozen_blocks]:
            _short_circuit(block, _block_passthrough)
            self._patched.append(block)
        if self.policy.kind == "head":
            _short_circuit(base.pooler, _pooler_passthrough)
            self._patched.append(base.pooler)

    def restore(self) -> None:
        """Put the frozen modules back in the forward pass (before saving or using the model normally)."""
        for module in self._patched:
            _restore(module)
        self._patched.clear()

    def loader(self, split: str, batch_size: int, seed: int, group_by_length: bool = False,
               num_workers: int = 0) -> DataLoader:
        """Batches of cached features; the sampler sees the original token lengths, so batches match the normal path."""
        train = split == "train"
        sampler = EpochBatchSampler(self.train_lengths if train else self.eval_lengths, batch_size, seed, shuffle=train,
                                    sort_by_length=not train, group_by_length=group_by_length)
        return DataLoader(self.train if train else self.eval, batch_sampler=sampler,
                          collate_fn=_FeatureCollator(self.pad_to_multiple_of), num_workers=num_workers,
                          pin_memory=torch.cuda.is_available())


def run_loaders(accelerator, model, policy, train_ds, eval_ds, collator, cfg, eval_batch_size: int, workers: int,
                log=print) -> tuple["FrozenCache | None", DataLoader, DataLoader]:
    """The training run's loaders: over the frozen part's cached outputs with --cache-frozen (the cache is
    built here, the frozen part runs once), else over the tokenized rows. Returns (cache or None, train, eval)."""
    if not cfg.cache_frozen:
        return (None, make_loader(train_ds, collator, cfg.batch_size, cfg.seed, train=True, num_workers=workers,
                                  group_by_length=cfg.group_by_length),
                make_loader(eval_ds, collator, eval_batch_size, cfg.seed, train=False, num_workers=workers))
    cache = FrozenCache.build(accelerator, model, policy, train_ds, eval_ds, collator, eval_batch_size, log)
    return (cache, cache.loader("train", cfg.batch_size, cfg.seed, cfg.group_by_length, workers),
            cache.loader("eval", eval_batch_size, cfg.seed, num_workers=workers))
