"""``--device`` of the commands that load a checkpoint (generate, retrieval, evaluate's loader):
a device this machine lacks is named as such before any checkpoint is read (issue 27.7)."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.errors import UsageError
from kimi_linear.lightning import generate, load


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_on_a_cpu_machine_is_no_cuda_device_not_a_bad_checkpoint(tmp_path):
    missing = tmp_path / "no-such.ckpt"  # the device is checked first: no checkpoint is read
    with pytest.raises(UsageError, match="--device: 'cuda' but there is no CUDA device here"):
        load.load_model(missing, "cuda")
    with pytest.raises(UsageError, match="no CUDA device"):
        generate.generate_main(
            ["--ckpt_path", str(missing), "--prompt", "hi", "--device", "cuda:0"]
        )


def test_a_bad_device_name_is_refused_with_the_argument_named():
    with pytest.raises(UsageError, match="--device: 'gpu' is not a device name"):
        load.check_device("gpu")
    assert load.check_device("cpu") == torch.device("cpu")
