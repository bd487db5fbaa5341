"""A process whose first LLaMA is built under DeepSpeed ZeRO-3 (``CausalLM.configure_model`` inside ``zero.Init``)
can build and train another one afterwards.

transformers imports a family's modeling module the first time a model of it is built; imported inside
``zero.Init``, its classes get their undecorated ``__init__`` back when the context ends, which drops what the
``kernels`` package's decorators set up per instance, and every later model of the family fails in forward
("'LlamaAttention' object has no attribute '_kernel_funcs'"): a second fit, a sweep, a notebook.
``LitDeepSpeedStrategy.model_sharded_context`` imports the model's class before ``zero.Init`` starts; without that,
this test's second fit raises exactly that error.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _helpers import run_torchrun

WORKER = Path(__file__).with_name("zero3_model_import_worker.py")


def test_a_second_zero3_fit_after_the_first_import_of_the_model_family(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    # TORCHDYNAMO_DISABLE: DeepSpeed imports a module that calls torch.compile at import time, loading the inductor
    # compiler (seconds of CPU) that nothing here uses.
    (rank,) = run_torchrun(WORKER, tmp_path, out=tmp_path, nproc=1, timeout=240, TORCHDYNAMO_DISABLE="1")
    assert rank["first_import_in_the_fit"], "the modeling module was imported before the first fit: nothing tested"
    for fit in rank["fits"]:
        assert fit["global_step"] == 1 and math.isfinite(fit["loss"]), rank["fits"]
