"""timeline.json: the first iterations that move data (or just the first, when none does), their layer
computes and copies as a Chrome/Perfetto trace, so that a user can open it (chrome://tracing,
ui.perfetto.dev) and see the copies overlap the layers."""
from __future__ import annotations

from pathlib import Path

from pie_policy.plan import D2H, DISK_READ, DISK_WRITE, H2D
from pie_serving.outputs import json_text

from .timeline import Timeline

COMPUTE = 1
COPIES = {H2D: (2, "host→device copies"), D2H: (3, "device→host copies"),
          DISK_READ: (4, "disk→host reads"), DISK_WRITE: (5, "host→disk writes")}


def write_chrome_trace(timeline: Timeline, path: Path) -> None:
    tracks = [(COMPUTE, "GPU compute")] + [COPIES[d] for d in timeline.links.busy]  # the hardware's directions
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}} for tid, name in tracks]
    computes, copies = timeline.trace["copying"] if timeline.trace["copying"][0] else timeline.trace["any"]
    for iteration, layer, start, seconds in computes:
        events.append({"name": f"layer {layer}", "ph": "X", "pid": 0, "tid": COMPUTE,
                       "ts": start * 1e6, "dur": seconds * 1e6, "args": {"iteration": iteration}})
    links = timeline.links
    for iteration, copy in copies:
        if copy.op_id not in links.done:
            continue  # still in flight when the run ended
        start = links.started[copy.op_id]
        events.append({"name": f"{copy.kind} L{copy.layer}" if copy.layer is not None else copy.kind, "ph": "X",
                       "pid": 0, "tid": COPIES[copy.direction][0],
                       "ts": start * 1e6, "dur": (links.done[copy.op_id] - start) * 1e6,
                       "args": {"iteration": iteration, "bytes": copy.nbytes, "calls": copy.calls}})
    path.write_text(json_text({"traceEvents": events, "displayTimeUnit": "ms"}))
