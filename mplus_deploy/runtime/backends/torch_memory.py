"""The torch backend's memory on the device (``TorchRunner(fast=True)``): built once per memory version, not
copied at every query.

``HostMemory.prefill_feeds()`` names each memory version with a ``memory_id`` (a new number whenever the memory
changed); ``DeviceMemories.get(feeds)`` returns the ``DeviceMemory`` of that id, building it on a miss:

- STM K/V ``[L, Hkv, N, Dh]``, the LTM retriever keys and their int64 ages (valid rows): on the device;
- LTM K/V (the bulk: at mplus-8b ~150k rows x 32 layers, ~20 GB in bf16) stay in host memory, page-locked in
  place (``cudaHostRegister``, no copy) so the gather kernel (``plugins.memory_gather_triton``) reads the K0
  retrieved rows over the bus, host-mapped.

Retrieval is the exported graph's contract (``plugins.topk_retrieve``: mean-sigmoid scores over the valid
rows, exact top-k with its tie rule, oldest first): the Triton score + exact top-k kernel on CUDA, the
reference implementation on the CPU. On the CPU nothing is copied: the views are the feeds themselves.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from mplus_deploy import plugins

class DeviceMemory:
    def __init__(self, feeds: dict, device: torch.device, dtype: torch.dtype, host_map):
        dev = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        self.stm_k, self.stm_v = dev(feeds["stm_k"]), dev(feeds["stm_v"])
        self.layers = []
        if "ltm_keys" in feeds:
            for l in range(feeds["ltm_keys"].shape[0]):
                vl, ml = int(feeds["valid_len"][l]), int(feeds["merged_len"][l])
                self.layers.append({"keys": dev(feeds["ltm_keys"][l, :vl]), "ages": dev(feeds["ltm_ages"][l, :vl]),
                                    "valid": vl, "merged": ml})
            self.ltm_k, self.ltm_v = host_map(feeds["ltm_k"]), host_map(feeds["ltm_v"])
        self.cuda = device.type == "cuda"

    def retrieve(self, l: int, q: torch.Tensor, K0: int) -> torch.Tensor | None:
        """K0 indices (prefix order) of layer l for retriever queries ``q`` [T, d_r]; None for an empty LTM."""
        e = self.layers[l]
        if e["valid"] == 0:
            return None
        fn = plugins.topk_retrieve_triton if self.cuda else plugins.topk_retrieve
        return fn(q.float(), e["keys"].float(), e["valid"], e["ages"], K0, merged_len=e["merged"])

    def gather(self, l: int, idx: torch.Tensor, device: torch.device, dtype: torch.dtype):
        """Layer l's retrieved LTM (k, v) [Hkv, K0, Dh] on ``device``."""
        if self.cuda:
            k = plugins.memory_gather_triton(self.ltm_k[l], idx, out_device=device, axis=1)
            v = plugins.memory_gather_triton(self.ltm_v[l], idx, out_device=device, axis=1)
        else:
            i = idx.to(self.ltm_k.device)
            k, v = self.ltm_k[l].index_select(1, i), self.ltm_v[l].index_select(1, i)
        return k.to(device, dtype), v.to(device, dtype)


class DeviceMemories:
    """The last few memory versions' ``DeviceMemory`` (LRU), and the host buffers registered for them."""

    def __init__(self, device: torch.device, dtype: torch.dtype, keep: int = 2):
        self.device, self.dtype, self.keep = torch.device(device), dtype, int(keep)
        self._mems: OrderedDict = OrderedDict()
        self._registered: OrderedDict = OrderedDict()  # data_ptr -> tensor (kept alive while registered)
        self._lock = threading.Lock()

    def _host_map(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or t.is_pinned():
            return t
        t = t.contiguous()
        ptr = t.data_ptr()
        if ptr not in self._registered:
            err = torch.cuda.cudart().cudaHostRegister(ptr, t.numel() * t.element_size(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the LTM buffer ({t.numel() * t.element_size()} bytes) failed: "
                                   f"{err}")
            self._registered[ptr] = t
            while len(self._registered) > 4 * self.keep:
                old, _ = self._registered.popitem(last=False)
                torch.cuda.cudart().cudaHostUnregister(old)
        self._registered.move_to_end(ptr)
        return t

    def get(self, feeds: dict) -> DeviceMemory:
        mid = feeds.get("memory_id")
        with self._lock:
            if mid is not None and mid in self._mems:
                self._mems.move_to_end(mid)
                return self._mems[mid]
            dm = DeviceMemory(feeds, self.device, self.dtype, self._host_map)
            if mid is not None:
                self._mems[mid] = dm
                while len(self._mems) > self.keep:
                    self._mems.popitem(last=False)
            return dm

    def clear(self) -> None:
        with self._lock:
            self._mems.clear()
            if self.device.type == "cuda":
                for ptr in self._registered:
                    torch.cuda.cudart().cudaHostUnregister(ptr)
            self._registered.clear()
