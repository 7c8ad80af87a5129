"""torch_gloo's shared-memory links between ranks of one host (``shm_link``): bytes arrive
intact through two small slots over many pieces, to and from several peers at once and over
several lanes; a peer that cannot map the offered file gets the bytes over gloo instead; no file
is left in /dev/shm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distributed import run_ranks

SLOT = 4096  # bytes per slot: a 100 kB tensor is 25 pieces through two slots


def payload(src: int, dst: int, size: int, round_: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * src + 10 * dst + round_)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)


def exchange(
    rank: int, world: int, lanes: int, own_pod: bool, sizes: list[int], full_on: int = -1
) -> dict[str, object]:
    """Every rank sends every other rank one tensor per size, three rounds on one
    communicator (links made once, reused); returns what arrived wrong and the links made.
    ``own_pod``: every rank has a /dev/shm of its own, as pods do (it sees no peer's files)."""
    import tempfile

    import torch.distributed as dist

    from moe_worker.eplb.communicator import create_communicator, shm_link

    if own_pod:
        shm_link.SHM_DIRECTORY = own = tempfile.mkdtemp(prefix=f"pod{rank}-")
        real_open = os.open

        def pod_open(path: str, flags: int, *args: int) -> int:
            if "moe-eplb-" in str(path) and not str(path).startswith(own):
                raise FileNotFoundError(2, "No such file or directory", path)
            return real_open(path, flags, *args)

        shm_link.os.open = pod_open  # type: ignore[assignment]
    if rank == full_on:  # its /dev/shm has no room for the slots

        def no_room(fd: int, offset: int, length: int) -> None:
            raise OSError(28, "No space left on device")

        os.posix_fallocate = no_room
    groups = [dist.new_group(backend="gloo") for _ in range(lanes)]
    communicator = create_communicator(
        "torch_gloo", groups=groups, chunk_bytes=40_000, shm_slot_bytes=SLOT
    )
    wrong = []
    for round_ in range(3):
        received: dict[tuple[int, int], torch.Tensor] = {}
        for peer in range(world):  # one global order: by (src, dst, size)
            for src, dst in sorted({(rank, peer), (peer, rank)}):
                if src == dst:
                    continue
                for size in sizes:
                    if src == rank:
                        communicator.add_send(payload(src, dst, size, round_), dst)
                    else:
                        received[(src, size)] = torch.zeros(size, dtype=torch.uint8)
                        communicator.add_recv(received[(src, size)], src)
        communicator.execute()
        for (src, size), tensor in received.items():
            if not torch.equal(tensor, payload(src, rank, size, round_)):
                wrong.append((round_, src, size))
    links = {
        f"{kind}:{peer}": link is not None for (kind, _, peer), link in communicator._links.items()
    }
    communicator.close()
    return {"wrong": wrong, "links": links}


@pytest.mark.parametrize("lanes", [1, 2])
def test_bytes_through_shared_memory_equal_what_was_sent(lanes: int) -> None:
    before = set(Path("/dev/shm").glob("moe-eplb-*"))
    results = run_ranks(exchange, 3, lanes, False, [1, 4096, 100_003], timeout=180)
    for rank, result in enumerate(results):
        assert result["wrong"] == [], rank
        peers = [p for p in range(3) if p != rank]
        assert result["links"] == {
            **{f"send:{p}": True for p in peers},
            **{f"recv:{p}": True for p in peers},
        }
    assert set(Path("/dev/shm").glob("moe-eplb-*")) == before


def test_ranks_in_separate_pods_use_gloo_and_create_no_file() -> None:
    """Each rank sees only its own /dev/shm: every offer is refused, the bytes go over gloo."""
    results = run_ranks(exchange, 2, 1, True, [5000, 70_001], timeout=180)
    assert [r["wrong"] for r in results] == [[], []]
    assert results[0]["links"] == {"send:1": False, "recv:1": False}
    assert results[1]["links"] == {"send:0": False, "recv:0": False}


def test_only_an_existing_file_of_the_offered_size_and_nonce_is_mapped(tmp_path: Path) -> None:
    from moe_worker.eplb.communicator.shm_link import NONCE_BYTES, map_existing

    missing = tmp_path / "moe-eplb-missing"
    assert map_existing(str(missing), 8192, b"n" * NONCE_BYTES) is None
    assert not missing.exists()  # nothing created where the peer's file is not
    nonce = bytes(range(NONCE_BYTES))
    path = tmp_path / "moe-eplb-file"
    path.write_bytes(nonce + bytes(8192 - NONCE_BYTES))
    assert map_existing(str(path), 4096, nonce) is None  # another size
    assert map_existing(str(path), 8192, bytes(NONCE_BYTES)) is None  # another nonce
    slots = map_existing(str(path), 8192, nonce)
    assert slots is not None and slots.slot_bytes == 4096
    slots.slot(1)[:3] = torch.tensor([7, 8, 9], dtype=torch.uint8)
    slots.mapping.flush()
    assert path.read_bytes()[4096:4099] == bytes([7, 8, 9])  # the file's memory, shared


def test_a_full_dev_shm_means_gloo_for_that_sender_only() -> None:
    before = set(Path("/dev/shm").glob("moe-eplb-*"))
    results = run_ranks(exchange, 2, 1, False, [5000, 70_001], 0, timeout=180)
    assert [r["wrong"] for r in results] == [[], []]
    assert results[0]["links"] == {"send:1": False, "recv:1": True}
    assert results[1]["links"] == {"send:0": True, "recv:0": False}
    assert set(Path("/dev/shm").glob("moe-eplb-*")) == before
