"""The learning rates each policy tries: four points on a log scale around where its kind learns.

The ranges follow what the policy trains. Updating a pretrained encoder (full fine-tuning, the last N
blocks, layer-wise decay, gradual unfreezing, which ends as full fine-tuning) wants small rates: BERT's own
recipe is 2e-5..5e-5, and above ~3e-4 it tends to collapse to one class. A freshly initialised classifier
alone learns only at much larger rates (a linear probe: 1e-3..3e-2). LoRA's best rate is about 10x full
fine-tuning's ("LoRA Without Regret", 2025), and its adapters start at zero, so 1e-4..3e-3.
"""

from __future__ import annotations

import math

from ..core.errors import ToolkitError
from ..policy.policy import Policy

ENCODER = (1e-5, 3e-5, 1e-4, 3e-4)
HEAD = (1e-3, 3e-3, 1e-2, 3e-2)
LORA = (1e-4, 3e-4, 1e-3, 3e-3)


def default_grid(policy: Policy) -> tuple[tuple[float, ...], str]:
    """(rates, why those) for a policy: by what it trains over the whole run."""
    if policy.kind == "lora":
        return LORA, "LoRA: about 10x full fine-tuning's rate, adapters start at zero"
    if policy.kind == "head" and policy.unfreeze_to is None:
        return HEAD, "classifier only: a linear probe on frozen features needs large rates"
    return ENCODER, "updates pretrained encoder blocks: BERT's 2e-5..5e-5 range and a decade around it"


def parse_grid_overrides(entries: list[str] | None, specs: list[str]) -> dict[str, tuple[float, ...]]:
    """--lr-grid POLICY=lr,lr,... (repeatable) -> {policy spec: sorted rates}."""
    grids: dict[str, tuple[float, ...]] = {}
    for entry in entries or []:
        spec, sep, rates = entry.partition("=")
        spec = spec.strip()
        if not sep or not spec:
            raise ToolkitError(f"--lr-grid {entry!r} does not say which policy it is for",
                               "spell it POLICY=LR,LR,... e.g. --lr-grid lora=1e-4,3e-4,1e-3")
        if spec not in specs:
            raise ToolkitError(f"--lr-grid names policy {spec!r}, which --policies does not list",
                               f"use one of: {', '.join(specs)}")
        if spec in grids:
            raise ToolkitError(f"--lr-grid gives policy {spec!r} twice", "give each policy one --lr-grid")
        try:
            values = [float(v) for v in rates.split(",") if v.strip()]
        except ValueError:
            raise ToolkitError(f"--lr-grid {entry!r}: {rates!r} is not a list of numbers",
                               "spell it POLICY=LR,LR,... e.g. --lr-grid lora=1e-4,3e-4,1e-3") from None
        if not values:
            raise ToolkitError(f"--lr-grid {entry!r} is empty", "give at least one learning rate, e.g. lora=1e-3")
        if bad := [v for v in values if not (math.isfinite(v) and v > 0)]:
            raise ToolkitError(f"--lr-grid {entry!r}: {', '.join(f'{v:g}' for v in bad)} is not a positive rate",
                               "learning rates must be finite and > 0")
        if len(set(values)) != len(values):
            raise ToolkitError(f"--lr-grid {entry!r} lists a rate twice", "list each rate once")
        grids[spec] = tuple(sorted(values))
    return grids
