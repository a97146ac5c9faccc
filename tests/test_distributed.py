"""``lead_first``: rank 0 builds shared data while the others wait, and a failure there stops every rank."""

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from sae.distributed import lead_first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, directory: str, fail: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    marker = os.path.join(directory, "built")

    def build() -> str:
        if os.path.exists(marker):
            return f"rank {rank} opened"
        if rank != 0:
            return f"rank {rank} built"  # would be a second builder
        if fail:
            raise ValueError("no text")
        open(marker, "w").close()
        return "rank 0 built"

    try:
        result = lead_first(build)
    except (ValueError, RuntimeError) as err:
        result = f"rank {rank} failed: {type(err).__name__}"
    with open(os.path.join(directory, f"rank{rank}"), "w") as out:
        out.write(result)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_rank_zero_builds_first_and_its_failure_stops_the_others(tmp_path, fail):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), fail), nprocs=2, start_method="fork")
    results = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if fail:
        assert results == ["rank 0 failed: ValueError", "rank 1 failed: RuntimeError"]
    else:
        assert results == ["rank 0 built", "rank 1 opened"]
