"""What only more than two processes show, read from the matrix's 4-process and two-node runs (``conftest.py``).

- **where each rank sits**: with ``torch.distributed.run --nnodes 2 --nproc-per-node 2`` launched twice (a c10d
  rendezvous on localhost) Lightning sees 2 nodes of 2 devices, and global rank = node rank x 2 + local rank;
- **DropBP agrees on 4 ranks**: the same sublayers are dropped on every rank at every step, and under DDP the
  gradients after the all-reduce are bit-identical on every rank, with exactly the dropped sublayers' parameters
  left without one;
- **the fused kernels under ZeRO-3 with 4 partitions**: ``lm_head.weight`` is split into 4 slices, FusedKernels
  registers it as an external parameter of the ``*ForCausalLM`` (whose forward the fused head + loss runs in, so
  ZeRO-3 gathers it there), the fused head + loss runs at every step (``lm_head``'s own forward never does), and the
  run's loss and final weights equal the single-device run's and DDP's (where the same fused head + loss runs, on
  CPU its PyTorch reference) within the fp32 tolerances;
- **LoRA's exports from 4 ZeRO-3 partitions**: the PEFT adapter holds the run's final adapters bit for bit, the merged
  model is the final base plus ``scaling * B @ A``, both equal the single-device run's exports within the fp32
  tolerance, and PEFT applying the adapter to the base model gives the merged model's logits;
- **two nodes train as two processes do**: ZeRO-1/2/3 on 2 nodes x 2 processes make the same DropBP decisions as with
  2 processes on one node, and reach the same losses and weights within the fp32 tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from matrix_common import (
    MAX_STEPS,
    MODEL_CONFIG,
    ROW_BY_ID,
    RUN_ROWS,
    RUNS,
    SINGLE_LOSS_ATOL,
    SINGLE_WEIGHTS_ATOL,
    WIDE_PROCESSES,
    WIDER_RUNS,
    Launch,
    final_weights_path,
    load_weights,
    loss_vs_single,
    results_of,
    weights_diff,
)

NODE_RUNS = [run for run in WIDER_RUNS if RUNS[run].nodes > 1]
MERGE_ATOL = 1e-6
"""Largest difference allowed between the exported merged weight and ``W + scaling * B @ A`` recomputed here (fp32;
the product is summed in another order)."""
LOGITS_ATOL = 1e-5
"""Largest difference allowed between PEFT's logits (base + adapter) and the merged model's (fp32)."""


def _ok(matrix: dict[str, Launch], run: str, row_id: str) -> list[dict[str, Any]]:
    per_rank = results_of(matrix, run)["rows"][row_id]
    assert all(r["status"] == "ok" for r in per_rank), [r["error"] for r in per_rank]
    return per_rank


@pytest.mark.parametrize("strategy", WIDER_RUNS)
def test_every_rank_sits_where_torchrun_put_it(matrix: dict[str, Launch], strategy: str) -> None:
    spec = RUNS[strategy]
    trained = 0
    for per_rank in results_of(matrix, strategy)["rows"].values():
        for rank, res in enumerate(per_rank):
            if res["status"] != "ok":
                continue  # a refused row never set the process group up
            trained += 1
            assert res["layout"] == {
                "global_rank": rank,
                "local_rank": rank % spec.devices,
                "node_rank": rank // spec.devices,
                "num_nodes": spec.nodes,
                "devices": spec.devices,
                "world_size": WIDE_PROCESSES,
            }, (rank, res["layout"])
    assert trained >= WIDE_PROCESSES


DROPBP_RUNS = [(run, row.id) for run, row in RUN_ROWS if run in WIDER_RUNS and row.id.startswith("dropbp")]


@pytest.mark.parametrize(("strategy", "row_id"), DROPBP_RUNS, ids=[f"{run}-{row}" for run, row in DROPBP_RUNS])
def test_dropbp_drops_the_same_sublayers_on_every_rank(matrix: dict[str, Launch], strategy: str, row_id: str) -> None:
    per_rank = _ok(matrix, strategy, row_id)
    for fit in ("full", "resumed"):
        if per_rank[0][fit] is None:
            continue  # a row this run does not resume
        masks = [[p["dropbp_mask"] for p in r[fit]["probes"]] for r in per_rank]
        assert all(m is not None for m in masks[0]) and any(any(m) for m in masks[0]), masks[0]
        for rank, mine in enumerate(masks[1:], start=1):
            assert mine == masks[0], f"{fit}: rank {rank} dropped {mine}, rank 0 {masks[0]}"
    allocation = [{k: v for k, v in r["full"]["state"].items() if k.startswith("callback/DropBP/")} for r in per_rank]
    assert allocation[0] and all(a == allocation[0] for a in allocation), "the ranks allocated other rates"
    if RUNS[strategy].stage is not None:
        # DeepSpeed reduces the gradients into its own buffers: the ranks' weights after every step say the rest.
        weights = [{k: v for k, v in r["full"]["state"].items() if k.startswith("module/")} for r in per_rank]
        assert all(w == weights[0] for w in weights)
        return
    grads = [r["full"]["grad_digests"] for r in per_rank]
    assert len(grads[0]) == MAX_STEPS and all(g == grads[0] for g in grads), grads
    for rank, res in enumerate(per_rank):
        # The parameters without gradient are exactly the trainable ones of the dropped sublayers, at every step.
        assert res["full"]["grads_as_dropped"] == [True] * MAX_STEPS, (rank, res["full"]["grads_as_dropped"])


def test_kernels_under_zero3_with_the_lm_head_in_4_partitions(matrix: dict[str, Launch]) -> None:
    numel = MODEL_CONFIG["vocab_size"] * MODEL_CONFIG["hidden_size"]
    zero3, ddp = f"zero3-{WIDE_PROCESSES}", f"ddp-{WIDE_PROCESSES}"
    for run in (zero3, ddp):
        for res in _ok(matrix, run, "kernels"):
            facts = res["facts"]
            # The fused head + loss is applied and ran at every step: lm_head's own forward never ran in training.
            assert facts["kernels.patched"] == {"rms_norm": 5, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1}
            assert not facts["kernels.skipped"] and facts["kernels.lm_head_forwards"] == 0, (run, facts)
            # Under ZeRO-3 each rank holds a quarter of the head's weight between steps.
            partitions = [numel // WIDE_PROCESSES, numel] if run == zero3 else None
            assert facts["kernels.lm_head_numel"] == partitions, (run, facts)
    row, single = ROW_BY_ID["kernels"], results_of(matrix, "single")
    for run in (zero3, ddp):
        loss = loss_vs_single(row, single, results_of(matrix, run))
        assert loss is not None and loss <= SINGLE_LOSS_ATOL, (run, loss)
    directory = matrix[zero3].directory
    final = {run: load_weights(final_weights_path(directory, run, "kernels")) for run in ("single", zero3, ddp)}
    assert weights_diff(final[zero3], final["single"]) <= SINGLE_WEIGHTS_ATOL
    assert weights_diff(final[zero3], final[ddp]) <= SINGLE_WEIGHTS_ATOL


EXPORTS = [(run, row.id) for run, row in RUN_ROWS if row.export and row.error is None]


def _export(matrix: dict[str, Launch], run: str, row_id: str) -> Path:
    return matrix[run].directory / run / row_id / "export"


def _adapter(export: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    return config, load_file(str(export / "adapter" / "adapter_model.safetensors"))


def _merged(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export / "merged" / "model.safetensors"))


@pytest.mark.parametrize(("strategy", "row_id"), EXPORTS, ids=[f"{run}-{row}" for run, row in EXPORTS])
def test_lora_exports_are_the_trained_model(matrix: dict[str, Launch], strategy: str, row_id: str) -> None:
    """Written once (by global rank 0, also with two nodes sharing the folder) from the gathered partitions: the
    adapter is the run's final ``A`` and ``B`` bit for bit, the merged model its final base plus ``scaling * B @ A``."""
    _ok(matrix, strategy, row_id)
    export = _export(matrix, strategy, row_id)
    final = load_weights(final_weights_path(matrix[strategy].directory, strategy, row_id))
    config, adapter = _adapter(export)
    scaling = config["lora_alpha"] / config["r"]
    names = sorted({k[: -len(".lora_A")] for k in final if k.endswith(".lora_A")})
    assert len(names) == ROW_BY_ID[row_id].expect["lora.layers"]
    assert set(adapter) == {f"base_model.model.{n[len('model.') :]}.lora_{x}.weight" for n in names for x in "AB"}
    merged = _merged(export)
    plain = {k[len("model.") :]: v for k, v in final.items() if ".lora_" not in k and ".base_layer." not in k}
    assert set(merged) == set(plain) | {f"{n[len('model.') :]}.weight" for n in names}
    for key, value in plain.items():
        assert torch.equal(merged[key], value), key
    for name in names:
        a, b = final[f"{name}.lora_A"], final[f"{name}.lora_B"]
        peft = f"base_model.model.{name[len('model.') :]}"
        assert torch.equal(adapter[f"{peft}.lora_A.weight"], a) and torch.equal(adapter[f"{peft}.lora_B.weight"], b)
        expected = final[f"{name}.base_layer.weight"] + scaling * (b @ a)
        torch.testing.assert_close(merged[f"{name[len('model.') :]}.weight"], expected, rtol=0, atol=MERGE_ATOL)


FOLLOWING_EXPORTS = [(run, row) for run, row in EXPORTS if run != "single" and ROW_BY_ID[row].ddp_equals_single]


@pytest.mark.parametrize(
    ("strategy", "row_id"), FOLLOWING_EXPORTS, ids=[f"{run}-{row}" for run, row in FOLLOWING_EXPORTS]
)
def test_lora_exports_equal_the_single_device_exports(matrix: dict[str, Launch], strategy: str, row_id: str) -> None:
    """From the same start (``test_follows_the_single_device_run``): the same adapter config, adapters and merged
    weights within SINGLE_WEIGHTS_ATOL (fp32) of the single-device run's exports; ZeRO-3 with 4 partitions among
    them."""
    mine, single = _export(matrix, strategy, row_id), _export(matrix, "single", row_id)
    (config, adapter), (single_config, single_adapter) = _adapter(mine), _adapter(single)
    assert config == single_config
    assert weights_diff(adapter, single_adapter) <= SINGLE_WEIGHTS_ATOL
    assert weights_diff(_merged(mine), _merged(single)) <= SINGLE_WEIGHTS_ATOL


def test_peft_applies_the_zero3_adapter_as_the_merged_model(matrix: dict[str, Launch]) -> None:
    """The adapter a 4-partition ZeRO-3 run wrote, loaded by PEFT over the base model, gives the logits of the merged
    model it wrote."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run = f"zero3-{WIDE_PROCESSES}"
    _ok(matrix, run, "lora")
    export = _export(matrix, run, "lora")
    base = AutoModelForCausalLM.from_pretrained(str(matrix[run].directory / "base"), dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(export / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(export / "merged"), dtype=torch.float32).eval()
    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("strategy", NODE_RUNS)
def test_two_nodes_train_as_two_processes_do(matrix: dict[str, Launch], strategy: str) -> None:
    """ZeRO-N on 2 nodes x 2 processes against ZeRO-N with 2 processes on one node, the same row: the same drop
    decisions, losses (mean over the ranks) within SINGLE_LOSS_ATOL, final weights within SINGLE_WEIGHTS_ATOL."""
    two = RUNS[strategy].strategy  # zero1 / zero2 / zero3: the same stage with 2 processes
    for row_id in results_of(matrix, strategy)["rows"]:
        nodes, local = _ok(matrix, strategy, row_id), _ok(matrix, two, row_id)
        assert nodes[0]["full"]["probes"] == local[0]["full"]["probes"], row_id
        loss = loss_vs_single(ROW_BY_ID[row_id], results_of(matrix, two), results_of(matrix, strategy))
        assert loss is not None and loss <= SINGLE_LOSS_ATOL, (row_id, loss)
        weights = [load_weights(final_weights_path(matrix[r].directory, r, row_id)) for r in (strategy, two)]
        assert weights_diff(*weights) <= SINGLE_WEIGHTS_ATOL, row_id
