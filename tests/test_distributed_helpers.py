"""rellax_fast.distributed in one process (no launcher): rank 0 of 1, contiguous balanced shards, shard files."""

import numpy as np
import pytest

from rellax_fast import distributed


def test_single_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.rank_world() == (0, 1) and distributed.is_main()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()  # a no-op
    with distributed.main_first():
        pass


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shard_bounds_are_contiguous_covering_and_balanced(world):
    rng = np.random.default_rng(world)
    weights = rng.lognormal(3.0, 1.0, 101)
    cuts = distributed.shard_bounds(weights, world)
    assert len(cuts) == world + 1 and cuts[0] == 0 and cuts[-1] == len(weights)
    assert all(a <= b for a, b in zip(cuts, cuts[1:]))
    totals = [weights[a:b].sum() for a, b in zip(cuts, cuts[1:])]
    assert max(totals) <= weights.sum() / world + weights.max() + 1e-9  # off by at most one unit's weight


def test_shard_bounds_edge_cases():
    assert distributed.shard_bounds([], 3) == [0, 0, 0, 0]
    assert distributed.shard_bounds([0, 0, 0, 0], 2) == [0, 2, 4]
    assert distributed.shard_bounds([5, 0, 0, 5], 2)[-1] == 4
    with pytest.raises(ValueError, match="world must be >= 1"):
        distributed.shard_bounds([1, 2], 0)


def test_sharded_rows_tile():
    for n in (0, 1, 10, 11):
        parts = [distributed.sharded_rows(n, r, 3) for r in range(3)]
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_shards_round_trip(tmp_path):
    folder = distributed.shard_folder(tmp_path / "train.npz", "retrieve")
    assert folder.parent == tmp_path and folder.name.startswith(".")
    for r in range(2):
        distributed.write_shard(folder, r, 2, {"x": np.arange(3) + r})
    shards = distributed.read_shards(folder, 2)
    assert [s["x"].tolist() for s in shards] == [[0, 1, 2], [1, 2, 3]]
    distributed.remove_shards(folder)
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="rank 0's shard is missing"):
        distributed.read_shards(folder, 2)


@pytest.mark.parametrize("ok", [True, False])
def test_shutdown_destroys_an_initialised_process_group(one_rank_gloo, ok):
    """The CLI's exit path: a live gloo group (a world of 1 here) is destroyed, so no gloo thread outlives the
    interpreter (the SIGABRT at exit seen under torchrun); a second call, and a call without a group, are
    no-ops."""
    dist = one_rank_gloo
    assert dist.is_initialized()
    distributed.shutdown(ok)
    assert not dist.is_initialized()
    distributed.shutdown(ok)  # nothing left to destroy


@pytest.mark.parametrize("code", [0, 3])
def test_cli_main_shuts_the_process_group_down_after_every_command(monkeypatch, code):
    from rellax_fast import cli

    calls = []
    monkeypatch.setattr(cli, "_run_command", lambda args: code)
    monkeypatch.setattr(distributed, "shutdown", lambda ok=True: calls.append(ok))
    assert cli.main(["info"]) == code
    assert calls == [code == 0]

    def boom(args):
        raise RuntimeError("command failed")

    monkeypatch.setattr(cli, "_run_command", boom)
    assert cli.main(["info"]) == cli.EXIT_BUG  # the guard's one line (tests/robustness/test_cli_guard.py)
    assert calls == [code == 0, False]
