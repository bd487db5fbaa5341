"""The resumable, rank-sharded training sampler and the sequential validation sampler."""

from __future__ import annotations

import pytest

from lit_accel.data import ResumableSampler, ShardedSequentialSampler


@pytest.mark.parametrize("n", [20, 23])
def test_two_ranks_disjoint_and_cover_truncated_permutation(n: int) -> None:
    s0 = ResumableSampler(n, batch_size=2, seed=7, rank=0, world_size=2)
    s1 = ResumableSampler(n, batch_size=2, seed=7, rank=1, world_size=2)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == len(s0) == n // 2
    assert not set(a) & set(b)
    single = list(ResumableSampler(n, batch_size=2, seed=7, rank=0, world_size=1))
    truncated = single[: n // 2 * 2]
    assert a == truncated[0::2] and b == truncated[1::2]
    assert sorted(a + b) == sorted(truncated)


def test_same_seed_same_order_and_epochs_differ() -> None:
    s = ResumableSampler(100, batch_size=4, seed=1)
    t = ResumableSampler(100, batch_size=4, seed=1)
    assert list(s) == list(t)
    assert list(s) != list(ResumableSampler(100, batch_size=4, seed=2))
    e0 = list(s)
    s.set_epoch(1)
    t.set_epoch(1)
    assert list(s) == list(t) != e0
    assert sorted(list(s)) == list(range(100))


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_skips_exactly_the_batches_done(rank: int) -> None:
    full = ResumableSampler(50, batch_size=4, seed=3, rank=rank, world_size=2)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(50, batch_size=4, seed=3, rank=rank, world_size=2)
    resumed.resume(epoch=2, batches_done=3)
    resumed.set_epoch(2)
    assert list(resumed) == order[12:]
    assert len(resumed) == len(order)  # Lightning counts from its restored batch counter
    resumed.set_epoch(3)
    full.set_epoch(3)
    assert list(resumed) == list(full)  # the skip applies to the saved epoch only


def test_sampler_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank=2"):
        ResumableSampler(10, batch_size=1, rank=2, world_size=2)


def test_sequential_sampler_shards() -> None:
    assert list(ShardedSequentialSampler(7, rank=0, world_size=2)) == [0, 2, 4, 6]
    s1 = ShardedSequentialSampler(7, rank=1, world_size=2)
    assert list(s1) == [1, 3, 5] and len(s1) == 3
