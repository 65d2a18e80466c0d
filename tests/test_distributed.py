"""Process layout helpers (the multi-process behaviour itself is tested through torchrun in test_pipeline)."""

import numpy as np
import pytest

from itdiffusion.training.distributed import World, all_sum, gather_rows, shard, world_from_env


def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ValueError):
            world_from_env(bad)


@pytest.mark.parametrize("n, size", [(10, 3), (7, 7), (100, 8), (5, 1)])
def test_shards_cover_the_data_in_order(n, size):
    blocks = [shard(n, World(r, size)) for r in range(size)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_one_process_helpers_are_no_ops():
    arrays = {"a": np.arange(6.0).reshape(3, 2)}
    assert gather_rows(arrays, World())["a"] is arrays["a"]
    assert all_sum([1.0, 2.0], World()) == [1.0, 2.0]
