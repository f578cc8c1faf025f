"""Where a benchmark's GPU memory went (``--memory-trace`` of train_step.py and packing.py)."""
from __future__ import annotations

import collections
from pathlib import Path


def start_trace() -> None:
    """From here on, record every allocation and segment with the Python stack that made it."""
    import torch

    torch.cuda.memory._record_memory_history(max_entries=500000)


def write_trace(path: str, header: str) -> None:
    """Write :func:`memory_summary` of the recording to ``path`` and stop recording."""
    import torch

    Path(path).write_text(memory_summary(torch.cuda.memory._snapshot(), header))
    torch.cuda.memory._record_memory_history(enabled=None)


def memory_summary(snap: dict, header: str) -> str:
    """The segments the allocator holds at the end, by pool (default / each CUDA-graph private pool) and stream,
    then the largest segment allocations of the run in order of size with the velotune / bench frames
    that asked for them (reserved memory only grows by segments)."""
    import torch

    from velotune.device import in_graph_pool  # imported late: a peer's process imports its own stack first

    gib = 2**30
    out = [f"{header}; peak allocated {torch.cuda.max_memory_allocated() / gib:.3f}, "
           f"peak reserved {torch.cuda.max_memory_reserved() / gib:.3f} GiB",
           "", "segments held at the end: pool, stream -> reserved / allocated MiB (segments)"]
    groups = collections.defaultdict(lambda: [0, 0, 0])
    for seg in snap["segments"]:
        pool = f"graph pool {tuple(seg['segment_pool_id'])}" if in_graph_pool(seg) else "default"
        g = groups[(pool, seg["stream"])]
        g[0], g[1], g[2] = g[0] + seg["total_size"], g[1] + seg["allocated_size"], g[2] + 1
    for (pool, stream), (total, used, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        out.append(f"  {pool:10s} stream {stream:#x}: {total / 2**20:9.1f} / {used / 2**20:9.1f} ({n})")
    events = [e for trace in snap.get("device_traces", []) for e in trace if e.get("action") == "segment_alloc"]
    out += ["", f"largest of {len(events)} segment allocations (MiB, stream, where):"]
    for e in sorted(events, key=lambda e: -e["size"])[:40]:
        out.append(f"  {e['size'] / 2**20:9.1f}  {e['stream']:#x}  {_where(e)}")
    # the default pool's unused reserve: which segments hold it, who cut them and what still lives in them
    made = {e["addr"]: e for e in events}  # a segment's latest allocation event (addresses are reused)
    default = [s for s in snap["segments"] if not in_graph_pool(s)]
    slack = sorted(default, key=lambda s: s["allocated_size"] - s["total_size"])
    out += ["", f"default-pool segments with the most free bytes (of {len(default)}, "
                f"{sum(s['total_size'] - s['allocated_size'] for s in default) / 2**20:.1f} MiB free in all): "
                "MiB total / free, largest free block; cut by; live blocks (MiB, where)"]
    for seg in slack[:15]:
        free = [b["size"] for b in seg["blocks"] if b["state"] != "active_allocated"]
        live = [b for b in seg["blocks"] if b["state"] == "active_allocated"]
        out.append(f"  {seg['total_size'] / 2**20:8.1f} / {(seg['total_size'] - seg['allocated_size']) / 2**20:7.1f}, "
                   f"{max(free, default=0) / 2**20:7.1f}; cut by {_where(made.get(seg['address'], {}))}")
        for b in sorted(live, key=lambda b: -b["size"])[:3]:
            out.append(f"      live {b['size'] / 2**20:8.2f}  {_where(b)}")
    return "\n".join(out) + "\n"


def _where(event: dict) -> str:
    """The velotune / bench frames of a recorded allocation event or block, innermost first."""
    frames = [f for f in event.get("frames", []) if "/velotune/" in f["filename"] or "/bench/" in f["filename"]][:4]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames) or "?"


def log_captures(path: str) -> None:
    """Append one line per CUDA-graph set velotune records (velotune.models.graphs.GraphSet) to ``path``: the
    batch shape, the process's reserved memory before and after, and the graph pools' reserved / allocated
    MiB and their largest free blocks after. What the bench needs to see whether a later capture reuses
    the pool's free blocks or cuts new segments."""
    import torch

    from velotune.device import in_graph_pool
    from velotune.models import graphs

    def pools() -> str:
        segs = [s for s in torch.cuda.memory_snapshot() if in_graph_pool(s)]
        free = sorted((b["size"] for s in segs for b in s["blocks"] if b["state"] == "inactive"), reverse=True)
        return (f"pool {sum(s['total_size'] for s in segs) / 2**20:.0f} / "
                f"{sum(s['allocated_size'] for s in segs) / 2**20:.0f} MiB in {len(segs)} segments, largest free "
                f"blocks {[round(f / 2**20, 1) for f in free[:8]]} MiB")

    init = graphs.GraphSet.__init__

    def logged(self, make_run_layer, layers, x_example, *a, **k):
        before = torch.cuda.memory_reserved()
        init(self, make_run_layer, layers, x_example, *a, **k)
        with open(path, "a") as f:
            cut, held = getattr(self, "scratch", None) or (0, 0)
            f.write(f"capture {tuple(x_example.shape[:2])}: reserved {before / 2**20:.0f} -> "
                    f"{torch.cuda.memory_reserved() / 2**20:.0f} MiB; warm-up cut {cut / 2**20:.0f} MiB "
                    f"({held / 2**20:.0f} held); {pools()}\n")

    graphs.GraphSet.__init__ = logged
