"""gravity_sparse.dist in two real processes (gloo, spawned), and as rank 0 of 1 in this one.

The spawned workers import this module, so it imports nothing heavy (no transformers, no test helpers).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gravity_sparse import dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init()
    got = {"rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main()}
    got["shares"] = [list(dist.share(n)) for n in (0, 1, 5, 8)]
    # float64 sums stay float64: values that float32 could not tell apart
    x = torch.tensor([1.0 + 1e-12 * (rank + 1), 2.0**-40], dtype=torch.float64)
    got["sum"] = dist.all_reduce_sum(x).tolist()
    got["dtype"] = str(x.dtype)
    got["sum_float"] = dist.sum_float(0.1 * (rank + 1))
    got["broadcast"] = dist.broadcast({"from": rank})
    got["gather"] = dist.gather((rank, "x" * rank))
    with dist.alone():  # this rank by itself: no collective, one process as accelerate sees it
        from accelerate.state import PartialState

        got["alone"] = (dist.world_size(), dist.rank(), dist.all_reduce_sum(torch.ones(1)).item())
        got["accelerate_alone"] = PartialState(cpu=True).num_processes
    got["after"] = (dist.world_size(), dist.rank(), os.environ["WORLD_SIZE"])
    dist.shutdown()
    torch.save(got, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_processes_share_reduce_broadcast_gather(two_ranks):
    r0, r1 = two_ranks
    assert (r0["rank"], r1["rank"], r0["world"], r0["main"], r1["main"]) == (0, 1, 2, True, False)
    # contiguous shares that cover every item once
    assert r0["shares"] == [[], [], [0, 1], [0, 1, 2, 3]]
    assert r1["shares"] == [[], [0], [2, 3, 4], [4, 5, 6, 7]]
    want = [2.0 + 3e-12, 2.0**-39]
    for r in two_ranks:
        assert r["dtype"] == "torch.float64"
        assert r["sum"][0] == pytest.approx(want[0], rel=1e-15, abs=0) and r["sum"][1] == want[1]
        assert r["sum_float"] == pytest.approx(0.3, rel=1e-15)
        assert r["broadcast"] == {"from": 0}
        assert r["gather"] == [(0, ""), (1, "x")]
        assert r["alone"] == (1, 0, 1.0) and r["accelerate_alone"] == 1
        assert r["after"] == (2, r["rank"], "2")


def test_one_process_is_rank_0_of_1(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not dist.launched() and dist.world_size() == 1 and dist.is_main()
    dist.init()  # nothing to join
    assert not torch.distributed.is_initialized()
    t = torch.arange(3.0)
    assert dist.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert dist.gather("a") == ["a"] and dist.broadcast(5) == 5 and list(dist.share(3)) == [0, 1, 2]
    assert dist.describe()["world_size"] == 1
