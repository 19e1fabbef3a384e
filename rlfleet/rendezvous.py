"""Where process groups meet: the TCP store a group's first rank hosts (the learner group's torch.distributed group,
the gloo weight-transfer group of the broadcast transport)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def host_store(address: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store a group's rank 0 (or its launcher) hosts, listening before anyone is told where: on a
    port the OS picks as it binds (``store.port``). A port picked beforehand and bound later can be taken meanwhile
    (a CI run failed with EADDRINUSE so)."""
    return dist.TCPStore(address, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)
