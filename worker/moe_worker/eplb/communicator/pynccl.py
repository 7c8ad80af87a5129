"""``pynccl``: NCCL called directly through ctypes, with no torch.distributed global state.

The communicator is created from a unique id that rank 0 puts into a ``torch.distributed``
``TCPStore`` (under a key prefix, one per group generation) and every rank reads, so a new
group of ranks can be formed at any time (elastic EP). Transfers run on the communicator's own
CUDA stream. ``libnccl.so.2`` is taken from the NVIDIA NCCL wheel when installed, else from the
system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from datetime import timedelta
from typing import Any

import torch

from .base import Communicator, register

NCCL_SUCCESS = 0


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def _library_path() -> str:
    candidates: list[str] = []
    try:
        import nvidia.nccl  # type: ignore[import-not-found]

        for root in nvidia.nccl.__path__:
            candidates += glob.glob(os.path.join(root, "lib", "libnccl.so*"))
    except ImportError:
        pass
    found = ctypes.util.find_library("nccl")
    if found:
        candidates.append(found)
    candidates.append("libnccl.so.2")
    return candidates[0]


class NcclLibrary:
    """The few NCCL entry points the exchange needs."""

    _instance: NcclLibrary | None = None

    def __init__(self, path: str | None = None) -> None:
        self.path = path or _library_path()
        lib = ctypes.CDLL(self.path)
        self.lib = lib
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        lib.ncclGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(NcclUniqueId)]
        lib.ncclCommInitRank.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            NcclUniqueId,
            ctypes.c_int,
        ]
        for name in ("ncclSend", "ncclRecv"):
            getattr(lib, name).argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]

    @classmethod
    def get(cls) -> NcclLibrary:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def check(self, result: int) -> None:
        if result != NCCL_SUCCESS:
            message = self.lib.ncclGetErrorString(result).decode()
            raise RuntimeError(f"NCCL error {result}: {message}")

    def version(self) -> int:
        value = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(value)))
        return value.value

    def unique_id(self) -> NcclUniqueId:
        uid = NcclUniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)))
        return uid


def _dtype_table() -> dict[torch.dtype, int]:
    """torch dtype -> ncclDataType_t, computed once at import."""
    table = {
        torch.int8: 0,
        torch.uint8: 1,
        torch.int32: 2,
        torch.int64: 4,
        torch.float16: 6,
        torch.float32: 7,
        torch.float64: 8,
        torch.bfloat16: 9,
    }
    for name, code in (("float8_e4m3fn", 10), ("float8_e5m2", 11)):
        if hasattr(torch, name):
            table[getattr(torch, name)] = code
    return table


NCCL_DTYPES = _dtype_table()


@register("pynccl")
class PyNcclCommunicator(Communicator):
    """Point-to-point over its own NCCL communicator and CUDA stream."""

    def __init__(
        self,
        rank: int,
        world: int,
        store: Any,
        device: torch.device | str,
        key: str = "moe-eplb/pynccl/0",
        timeout_s: float = 120.0,
        stripes: int = 1,
        **_: Any,
    ) -> None:
        """``stripes`` > 1: that many NCCL communicators, each on its own stream; every
        tensor is split into that many byte ranges sent side by side."""
        self.library = NcclLibrary.get()
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("pynccl needs a CUDA device")
        self.comms: list[ctypes.c_void_p] = []
        for stripe in range(stripes):
            stripe_key = f"{key}/{stripe}"
            if rank == 0:
                uid = self.library.unique_id()
                store.set(stripe_key, bytes(uid.internal))
            else:
                store.wait([stripe_key], timedelta(seconds=timeout_s))
                uid = NcclUniqueId()
                ctypes.memmove(uid.internal, store.get(stripe_key), 128)
            comm = ctypes.c_void_p()
            with torch.cuda.device(self.device):
                self.library.check(
                    self.library.lib.ncclCommInitRank(ctypes.byref(comm), world, uid, rank)
                )
            self.comms.append(comm)
        self._streams = [torch.cuda.Stream(self.device) for _ in range(stripes)]
        self._stream = self._streams[0]
        self._ops: list[tuple[str, torch.Tensor, int]] = []

    @property
    def stream(self) -> torch.cuda.Stream:
        return self._stream

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        self._ops.append(("send", tensor.contiguous(), dst_rank))

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        self._ops.append(("recv", tensor, src_rank))

    def execute(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        lib = self.library.lib
        stripes = len(self.comms)
        current = torch.cuda.current_stream(self.device)
        for stripe, (comm, stream) in enumerate(zip(self.comms, self._streams, strict=True)):
            # Inputs may come from the caller's stream: order our stream after it.
            stream.wait_stream(current)
            handle = ctypes.c_void_p(stream.cuda_stream)
            self.library.check(lib.ncclGroupStart())
            try:
                for kind, tensor, peer in ops:
                    if stripes == 1:
                        code = NCCL_DTYPES.get(tensor.dtype)
                        part, count = tensor, tensor.numel()
                        if code is None:  # any other dtype travels as bytes
                            code, count = 1, tensor.numel() * tensor.element_size()
                    else:
                        flat = tensor.view(-1).view(torch.uint8)
                        size = -(-flat.numel() // stripes)
                        part = flat[stripe * size : (stripe + 1) * size]
                        code, count = 1, part.numel()
                    if count == 0:
                        continue
                    function = lib.ncclSend if kind == "send" else lib.ncclRecv
                    pointer = ctypes.c_void_p(part.data_ptr())
                    self.library.check(function(pointer, count, code, peer, comm, handle))
            finally:
                self.library.check(lib.ncclGroupEnd())
        for stream in self._streams:
            for _, tensor, _ in ops:
                tensor.record_stream(stream)
            stream.synchronize()

    def close(self, abort: bool = False) -> None:
        release = self.library.lib.ncclCommAbort if abort else self.library.lib.ncclCommDestroy
        for comm in self.comms:
            self.library.check(release(comm))
        self.comms = []
