"""choose_mixed_precision on the GPUs people actually have, and on CPU."""

import pytest
import torch

from toolkit.backends.precision import choose_mixed_precision, device_capability
from toolkit.core.errors import ToolkitError

T4, V100, A100, H100, CPU = (7, 5), (7, 0), (8, 0), (9, 0), None


@pytest.mark.parametrize("requested", [None, "auto", "AUTO", " auto "])
@pytest.mark.parametrize(
    "capability, expected",
    [(T4, "fp16"), (V100, "fp16"), (A100, "bf16"), (H100, "bf16"), ((8, 6), "bf16"), (CPU, "no")],
)
def test_auto_picks_what_the_device_does_natively(requested, capability, expected):
    assert choose_mixed_precision(requested, capability) == expected


@pytest.mark.parametrize("capability", [T4, V100, A100, H100])
@pytest.mark.parametrize("requested", ["no", "fp16"])
def test_explicit_no_and_fp16_are_honoured_on_every_gpu(requested, capability):
    assert choose_mixed_precision(requested, capability) == requested


@pytest.mark.parametrize("capability", [A100, H100])
def test_explicit_bf16_on_ampere_and_newer(capability):
    assert choose_mixed_precision("bf16", capability) == "bf16"
    assert choose_mixed_precision("BF16", capability) == "bf16"


@pytest.mark.parametrize("capability", [T4, V100])
def test_explicit_bf16_on_pre_ampere_gpu_is_refused_with_a_fix(capability):
    with pytest.raises(ToolkitError) as err:
        choose_mixed_precision("bf16", capability)
    assert f"{capability[0]}.{capability[1]}" in err.value.problem
    assert "fp16" in err.value.fix


def test_cpu_accepts_no_and_explicit_bf16():
    assert choose_mixed_precision("no", CPU) == "no"
    assert choose_mixed_precision("bf16", CPU) == "bf16"


def test_fp16_on_cpu_is_refused_with_a_fix():
    with pytest.raises(ToolkitError) as err:
        choose_mixed_precision("fp16", CPU)
    assert "CPU" in err.value.problem
    assert "bf16" in err.value.fix and "no" in err.value.fix


@pytest.mark.parametrize("requested", ["fp32", "float16", "fp8", "", "yes"])
@pytest.mark.parametrize("capability", [T4, A100, CPU])
def test_unknown_mode_is_refused(requested, capability):
    with pytest.raises(ToolkitError) as err:
        choose_mixed_precision(requested, capability)
    assert "bf16" in err.value.fix


def test_device_capability_matches_torch():
    cap = device_capability()
    if torch.cuda.is_available():
        assert cap == tuple(torch.cuda.get_device_capability())
    else:
        assert cap is None
        # what the toolkit does on this machine when nothing is asked for
        assert choose_mixed_precision(None, cap) == "no"
