"""The fused LM head + loss under DeepSpeed ZeRO-3: it runs with ``lm_head.weight`` partitioned, and trains as one
device does.

``zero3_fused_loss_worker.py`` trains a tiny LLaMA patched by FusedKernels for a few AdamW steps, on one device
without DeepSpeed and under ``LitDeepSpeedStrategy`` ZeRO-3 with 2 processes: untied and tied LM heads built under
``zero.Init``, and a model partitioned only after FusedKernels patched it. On the CPU (gloo, DeepSpeed's CPU
accelerator) both runs set ``TRITON_INTERPRET=1``, so the fused loss runs its Triton kernel through Triton's
interpreter, as on GPUs: chunk by chunk, never materialising the logits, with the head's gradient computed in the
forward from the gathered weight. The PyTorch reference of the op runs under ZeRO-3 in the distributed matrix
(``tests/matrix``). The GPU test runs the same on CUDA with every kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import REPO, run_torchrun, worker_env

WORKER = Path(__file__).with_name("zero3_fused_loss_worker.py")
STEPS = 4
"""AdamW steps of every run (``zero3_fused_loss_worker.STEPS``)."""
HEAD_NUMEL = 128 * 64
"""Elements of the LM head's weight (vocabulary x hidden)."""
LOSS_ATOL = 1e-5
"""Largest difference allowed between the ZeRO-3 loss (mean over the 2 ranks' equal shares of the batch) and the
single-device loss, at every step (fp32; measured up to 4.8e-7)."""
WEIGHTS_ATOL = 5e-4
"""Largest difference allowed between an element of the final weights under ZeRO-3 and on one device (fp32, after 4
AdamW steps at lr 1e-2). The reductions sum in another order, and where an element's gradient is near zero AdamW's
normalised update magnifies that rounding (measured up to 2.9e-5 here, in an MLP weight; the distributed matrix
allows the same)."""
HEAD_ATOL = 1e-5
"""The same for the LM head's weight (the tied embedding's), whose gradient the fused op computes (measured up to
8.6e-7)."""


def _base(directory: Path, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def _train(tmp_path: Path, accelerator: str, nproc: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The worker's one-device run (a plain process: no torchrun, no DeepSpeed) and its ZeRO-3 run with ``nproc``
    processes: each rank's records."""
    bases = (_base(tmp_path / "base", tied=False), _base(tmp_path / "base_tied", tied=True))
    # On the CPU the fused loss runs its Triton kernel through Triton's interpreter; on GPUs, DeepSpeed's CUDA
    # accelerator (worker_env would pick its CPU one).
    env = {"TRITON_INTERPRET": "1"} if accelerator == "cpu" else {"DS_ACCELERATOR": None}
    env["LIT_ACCEL_TEST_ACCELERATOR"] = accelerator
    for mode in ("single", "zero3"):
        (tmp_path / mode).mkdir()
    proc = subprocess.run(
        [sys.executable, str(WORKER), "single", str(tmp_path / "single"), *map(str, bases)],
        env=worker_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    out = tmp_path / "zero3"
    return single, run_torchrun(WORKER, "zero3", out, *bases, out=out, nproc=nproc, timeout=240, **env)


def _check(tmp_path: Path, single: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    """The fused loss ran at every step of every variant on every rank, and each variant's losses and final
    weights equal the one-device run's."""
    world = len(ranks)
    assert [r["world_size"] for r in ranks] == [world] * world
    for variant in ("untied", "tied", "late"):
        reference = single["untied" if variant == "late" else variant]  # "late": the untied model, built earlier
        assert reference["head_calls"] == [0] * STEPS and reference["logits_none"] == [True] * STEPS, reference
        assert reference["fused_calls"] == {"kernel": STEPS, "reference": 0}, reference
        for rank, record in enumerate(ranks):
            rec, where = record[variant], (variant, rank)
            assert rec["global_step"] == STEPS, where
            # The fused head + loss was applied and its kernel ran at every step: lm_head's own forward never ran in
            # training and no training forward returned logits.
            assert rec["patched"]["linear_cross_entropy"] == 1 and not rec["skipped"], (where, rec)
            assert rec["fused_calls"] == {"kernel": STEPS, "reference": 0}, (where, rec)
            assert rec["head_calls"] == [0] * STEPS and rec["logits_none"] == [True] * STEPS, (where, rec)
            # ... with the head's weight partitioned and released between steps, so each forward gathered it.
            head = rec["head"]
            assert head["partitioned"] and head["numel"] == [HEAD_NUMEL // world, HEAD_NUMEL], (where, head)
            assert head["tied"] is (variant == "tied"), (where, head)
            assert rec["whole_between_steps"] == [False] * STEPS, (where, rec)
            # FusedKernels registered it as an external parameter of the *ForCausalLM; partitioned only after the
            # patch, it is registered in the first forward by DeepSpeed's engine, which gathers a partitioned
            # parameter read outside its module's forward.
            assert head["registered"] is (variant != "late") and head["registered_at_end"], (where, head)
        mean = [sum(losses) / world for losses in zip(*(r[variant]["losses"] for r in ranks), strict=True)]
        loss_diff = max(abs(a - b) for a, b in zip(mean, reference["losses"], strict=True))
        assert loss_diff <= LOSS_ATOL, (variant, mean, reference["losses"])
        assert mean[-1] < 0.9 * mean[0], mean  # it trained
        got = torch.load(tmp_path / "zero3" / f"{variant}.pt")
        want = torch.load(tmp_path / "single" / f"{'untied' if variant == 'late' else variant}.pt")
        assert got.keys() == want.keys()
        diffs = {k: (got[k] - want[k]).abs().max().item() for k in want}
        assert max(diffs.values()) <= WEIGHTS_ATOL, (variant, max(diffs.items(), key=lambda kv: kv[1]))
        assert diffs["model.lm_head.weight"] <= HEAD_ATOL, (variant, diffs["model.lm_head.weight"])


def test_fused_loss_under_zero3_runs_and_trains_as_one_device(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    _check(tmp_path, *_train(tmp_path, "cpu", nproc=2))


@pytest.mark.gpu
def test_gpu_fused_loss_under_zero3_runs_and_trains_as_one_gpu(tmp_path: Path) -> None:
    """The same on CUDA with every Triton kernel, fp32, over 2 GPUs (one where only one is present: ZeRO-3 then
    keeps one partition, still released between steps and gathered for each forward)."""
    pytest.importorskip("deepspeed")
    _check(tmp_path, *_train(tmp_path, "gpu", nproc=min(2, torch.cuda.device_count())))


def _fake_partitioned_head(model: Any) -> torch.nn.Parameter:
    """Marks ``model.lm_head.weight`` as ZeRO-3 does a partitioned parameter (``ds_id``, and ``ds_shape`` its whole
    shape), keeping its data whole: a gathered parameter, without DeepSpeed's engine."""
    weight = model.lm_head.weight
    weight.ds_id = 0
    weight.ds_shape = weight.shape
    return weight  # type: ignore[no-any-return]


def test_partitioned_head_is_registered_as_an_external_parameter_and_unregistered() -> None:
    pytest.importorskip("deepspeed")
    from _helpers import tiny_llama

    from lit_accel.kernels import apply_kernels, remove_kernels

    for tied in (False, True):
        model = tiny_llama(tie_word_embeddings=tied)
        weight = _fake_partitioned_head(model)
        report = apply_kernels(model, strict=True)
        assert report.counts()["linear_cross_entropy"] == 1 and not report.skipped
        assert model._external_params == {id(weight): weight}  # registered with the *ForCausalLM
        apply_kernels(model, strict=True)  # idempotent: registered once
        assert model._external_params == {id(weight): weight}
        ids = torch.randint(0, 128, (2, 8))
        assert model(input_ids=ids, labels=ids).logits is None  # the fused loss read the (whole) weight
        remove_kernels(model)
        assert model._external_params == {}


def test_a_partitioned_head_not_gathered_falls_back_to_its_own_forward() -> None:
    """A forward that runs without ZeRO-3's gather (outside the engine, or ``lm.forward`` called directly) warns
    and runs Hugging Face's head, whose own forward gathers the weight, rather than reading an empty partition."""
    pytest.importorskip("deepspeed")
    from _helpers import tiny_llama

    from lit_accel.kernels import apply_kernels

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    expected = model(input_ids=ids, labels=ids).loss
    weight = _fake_partitioned_head(model)
    apply_kernels(model, strict=True)
    whole = weight.data
    weight.data = torch.empty(0)  # released, as between ZeRO-3's gathers

    def gather(module: Any, args: Any) -> None:  # what ZeRO-3's forward pre-hook on lm_head does
        weight.data = whole

    model.lm_head.register_forward_pre_hook(gather)
    with pytest.warns(UserWarning, match="was not gathered for this forward"):
        out = model(input_ids=ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, expected)
