"""Step bandwidth: the raw link, with plain torch copies (not the executor's copier, which calibrate
times): pinned host→device and device→host over a range of copy sizes, each direction alone and both at
once (each on its own stream), a pageable copy each way at the largest size, and a device-to-device copy
(what HBM moves, read plus write). Each point: `calls` copies back to back, timed by CUDA events on its
stream (the host's clock on the CPU), the median of REPEATS. Fits calls · latency + bytes / bandwidth per
direction (least squares of relative errors, as calibrate fits its copies) and sets them beside the
hardware entry's link. Writes bandwidth.csv (every point, then the fits).

On the CPU the "device" is host memory too and the copies run one after another on the calling thread,
as the CPU copier runs them: both directions "at once" take the sum of their times.
"""
from __future__ import annotations

import statistics
import time

import torch

from hwmodels import load_hardware
from hwmodels.profile import relative_fit

from .context import OK, Context, Result, ratio, table, write_rows

KiB, MiB = 1 << 10, 1 << 20
REPEATS = 3
# Calls per point: enough copies to move this much (at least 4, at most 2,000); a GPU's link moves 256 MiB
# in ~5 ms (PCIe 5) or ~1 ms (NVLink-C2C).
MOVED_PER_POINT = {"cuda": 256 * MiB, "cpu": 8 * MiB}


def sizes(ctx: Context) -> tuple[int, ...]:
    if not ctx.cuda:
        return (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB)
    if ctx.quick:
        return (64 * KiB, 4 * MiB, 64 * MiB)
    return (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB)


def calls_for(ctx: Context, nbytes: int) -> int:
    return min(2000, max(4, MOVED_PER_POINT[ctx.device] // nbytes))


class Link:
    """Host and device buffers of twice the largest size, each direction on its own stream: host→device
    copies use the first halves, device→host the second, so that both at once touch different memory."""

    def __init__(self, device: torch.device, largest: int):
        self.device, self.cuda, self.largest = device, device.type == "cuda", largest
        self.host = torch.ones(2 * largest, dtype=torch.uint8, pin_memory=self.cuda)
        self.pageable = torch.ones(2 * largest, dtype=torch.uint8)
        self.gpu = torch.ones(2 * largest, dtype=torch.uint8, device=device)
        self.streams = {d: torch.cuda.Stream(device) for d in ("h2d", "d2h", "d2d")} if self.cuda else {}

    def pair(self, direction: str, nbytes: int, pinned: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(destination, source) of a copy of `nbytes` in `direction`."""
        host, half = self.host if pinned else self.pageable, self.largest
        first, second = slice(0, nbytes), slice(half, half + nbytes)
        return {"h2d": (self.gpu[first], host[first]), "d2h": (host[second], self.gpu[second]),
                "d2d": (self.gpu[second], self.gpu[first])}[direction]

    def seconds(self, jobs: list[tuple[str, int, int, bool]]) -> float:
        """Seconds from the first copy's start to the last one's end of `jobs` (direction, bytes, calls,
        pinned), each direction's run of copies on its stream, all issued at once."""
        if not self.cuda:
            start = time.perf_counter()
            for direction, nbytes, calls, pinned in jobs:
                dst, src = self.pair(direction, nbytes, pinned)
                for _ in range(calls):
                    dst.copy_(src)
            return time.perf_counter() - start
        torch.cuda.synchronize(self.device)
        marks = []
        for direction, nbytes, calls, pinned in jobs:
            dst, src = self.pair(direction, nbytes, pinned)
            stream = self.streams[direction]
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                begin.record(stream)
                for _ in range(calls):
                    dst.copy_(src, non_blocking=True)
                end.record(stream)
            marks.append((begin, end))
        torch.cuda.synchronize(self.device)
        first = marks[0][0]
        return (max(first.elapsed_time(end) for _, end in marks)
                - min(first.elapsed_time(begin) for begin, _ in marks)) / 1e3

    def median(self, jobs) -> float:
        self.seconds(jobs)  # warm-up
        return statistics.median(self.seconds(jobs) for _ in range(REPEATS))


def point(link: Link, label: str, jobs: list[tuple[str, int, int, bool]]) -> dict:
    seconds = link.median(jobs)
    moved = sum(nbytes * calls for _, nbytes, calls, _ in jobs)
    calls = sum(calls for _, _, calls, _ in jobs)
    h2d = sum(n * c for d, n, c, _ in jobs if d == "h2d")
    return {"what": label, "bytes_per_call": jobs[0][1], "calls": calls, "bytes_h2d": h2d,
            "bytes_d2h": sum(n * c for d, n, c, _ in jobs if d == "d2h"), "seconds": seconds,
            "gb_s": moved / seconds / 1e9, "us_per_call": seconds / calls * 1e6}


def step(ctx: Context) -> Result:
    device = torch.device(ctx.device)
    hw = load_hardware(ctx.hw)
    largest = max(sizes(ctx))
    link = Link(device, largest)
    rows = []
    for nbytes in sizes(ctx):
        calls = calls_for(ctx, nbytes)
        for direction in ("h2d", "d2h"):
            rows.append(point(link, direction, [(direction, nbytes, calls, True)]))
        rows.append(point(link, "both at once", [("h2d", nbytes, calls, True), ("d2h", nbytes, calls, True)]))
    calls = calls_for(ctx, largest)
    for direction in ("h2d", "d2h"):
        rows.append(point(link, f"{direction} pageable", [(direction, largest, calls, False)]))
    rows.append(point(link, "d2d", [("d2d", largest, calls, True)]))
    fits = fit(rows)
    lines = table(["direction", "size", "GB/s", "µs a call"],
                  [[r["what"], _size(r["bytes_per_call"]), f"{r['gb_s']:.1f}", f"{r['us_per_call']:.1f}"]
                   for r in rows if r["bytes_per_call"] in (min(sizes(ctx)), largest) or "pageable" in r["what"]])
    entry = {"h2d GB/s": hw.link.h2d_bandwidth / 1e9, "d2h GB/s": hw.link.d2h_bandwidth / 1e9,
             "both at once GB/s": hw.link.bidirectional_bandwidth / 1e9,
             "latency µs": hw.link.transfer_latency * 1e6, "d2d (HBM read + write) GB/s": hw.gpu.hbm_bandwidth / 1e9}
    lines += ["", f"Fitted (calls · latency + bytes / bandwidth) against `{ctx.hw}`:", ""]
    lines += table(["figure", "measured", ctx.hw, "measured / entry"],
                   [[k, f"{fits[k]:.3g}", f"{v:.3g}", ratio(fits[k], v)] for k, v in entry.items()])
    rows += [{"what": f"fit: {k}", "bytes_per_call": "", "calls": "", "bytes_h2d": "", "bytes_d2h": "",
              "seconds": "", "gb_s": v, "us_per_call": ""} for k, v in fits.items()]
    return Result(OK, f"h2d {fits['h2d GB/s']:.1f} GB/s, d2h {fits['d2h GB/s']:.1f} GB/s", lines,
                  [write_rows(ctx.folder / "bandwidth.csv", rows)])


def fit(rows: list[dict]) -> dict[str, float]:
    """Per direction, calls · latency + bytes / bandwidth through its pinned points; one latency for both
    (as calibrate fits its copies); both at once: the largest size's rate; d2d: its rate."""
    one_way = [r for r in rows if r["what"] in ("h2d", "d2h")]
    latency, per_h2d, per_d2h = relative_fit([[r["calls"], r["bytes_h2d"], r["bytes_d2h"]] for r in one_way],
                                             [r["seconds"] for r in one_way])
    largest = max(r["bytes_per_call"] for r in one_way)
    both = next(r for r in rows if r["what"] == "both at once" and r["bytes_per_call"] == largest)
    d2d = next(r for r in rows if r["what"] == "d2d")
    return {"h2d GB/s": 1 / per_h2d / 1e9 if per_h2d > 0 else float("inf"),
            "d2h GB/s": 1 / per_d2h / 1e9 if per_d2h > 0 else float("inf"),
            "both at once GB/s": both["gb_s"], "latency µs": latency * 1e6,
            "d2d (HBM read + write) GB/s": 2 * d2d["gb_s"]}


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // KiB} KiB"
