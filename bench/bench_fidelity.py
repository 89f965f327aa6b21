"""How close the cost model's GPU times come to the shipped measurements (Vidur's A100 and H100 profiles):
predicted vs measured per part of a layer and per whole layer, by regime, with the mean and the worst
absolute relative error, for the roofline defaults (the catalog entries of the profiled servers) and for
the profile-driven model (measured.py) on held-out points.

    python -m bench.bench_fidelity

What is measured (bench/vidur_points.py): one GPU's layer (of the 1, 2, 4 or 8 splitting it) at every
token count the profiles time, as its GEMMs, element-wise kernels and, with tp > 1, two all-reduces; for
A100 Llama-2-7B on one GPU also 49 layers with their attention kernel (decode by batch and KV length,
prefill by chunk). No other profile times attention, so elsewhere a "whole layer" is the layer without its
attention. None times the LM head or the engine's host time per iteration, so no whole iteration is
compared.

Held out: the profile-driven model is built twice, each time from half of every measurement (token counts,
attention rows, all-reduce sizes of alternating index), and each point is predicted by the half that did
not see it. Points outside the other half's range (the first and last token counts) cannot be held out and
are left out of its figures. The roofline is fitted once to all points (bench/fit_roofline.py): its
figures are not held out.
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections import defaultdict

import numpy as np

from hwmodels import CatalogError, load_model
from hwmodels.measured import MeasuredLayers
from hwmodels.roofline import Roofline
from hwmodels.vidur import ProfileWarning, VidurProfile

from .vidur_points import DEGREES, DEVICES, MODELS, REGIMES, Point, fold, group_curves, points, profile, server

PARTS = ("gemm", "elementwise", "attention", "all_reduce")
# The catalog's roofline before it was fitted (every GPU entry: 60% of peak FLOPs, 80% of HBM bandwidth,
# 10 µs a layer, no element-wise work, no ridge): shown beside the fitted one on one GPU.
PREVIOUS = dict(flops_efficiency=0.6, hbm_efficiency=0.8, layer_overhead=10e-6, gemm_ridge_tokens=0.0,
                elementwise_efficiency=None, decode_attention_efficiency=None, prefill_attention_efficiency=None)
SOURCES = ("previous", "roofline", "profile")


def roofline_parts(point: Point, roofline: Roofline) -> dict:
    """The roofline's price of each measured part of `point` and of the whole layer (the per-layer
    overhead is in the whole layer only)."""
    tokens = point.tokens
    parts = {"gemm": roofline.gemm_time(tokens), "elementwise": roofline.elementwise_time(tokens)}
    if point.has_attention:
        parts["attention"] = roofline.attention_time(point.shape)
    if point.tp > 1:
        parts["all_reduce"] = 2 * roofline.all_reduce_time(tokens)
    whole = roofline.layer_time(point.shape) if point.has_attention else roofline.dense_time(tokens)
    return parts | {"whole": whole}


def held_out_parts(point: Point, halves: dict) -> dict | None:
    """The profile-driven price of `point` from the halves that did not see it (None: out of their range)."""
    dense_fold = 1 - halves["fold", point.device, point.model, point.tp].get(point.tokens, 1) \
        if point.has_attention else 1 - point.index % 2
    layers: MeasuredLayers = halves[point.device, point.model, point.tp, dense_fold, 1 - point.index % 2]
    tokens, groups = point.tokens, halves["groups", point.device, point.model, point.tp, dense_fold]
    try:
        parts = {group: groups[group](tokens) for group in ("gemm", "elementwise")}
        if point.has_attention:
            parts["attention"] = layers.attention_time(point.shape)
        if point.tp > 1:
            parts["all_reduce"] = 2 * layers.all_reduce_time(tokens)
        whole = layers.layer_time(point.shape) if point.has_attention else layers.dense_time(tokens)
    except CatalogError:
        return None
    return parts | {"whole": whole}


def build_halves(degrees: tuple = DEGREES) -> dict:
    """MeasuredLayers for every (device, model, tp, dense fold, attention fold); the folds' gemm and
    elementwise curves; and each measured token count's fold (an attention point's dense part is held out
    by the fold its token count is not in; a count never measured is in neither: fold 1 by convention)."""
    halves = {}
    for device in DEVICES:
        hw = server(device)
        for model in MODELS:
            m = load_model(model)
            for tp in degrees:
                counts = group_curves(device, model, tp)["gemm"].xs
                halves["fold", device, model, tp] = {int(x): i % 2 for i, x in enumerate(counts)}
                roofline = Roofline(hw, m, tp)
                for dense in (0, 1):
                    halves["groups", device, model, tp, dense] = group_curves(device, model, tp, fold(dense))
                    for attention in (0, 1):
                        dense_half, attention_half = profile(device, model, tp, dense), profile(device, model, tp, attention)
                        mixed = VidurProfile(dense_half.name, dense_half.ops, dense_half.dense, attention_half.attention,
                                             dense_half.all_reduce)
                        halves[device, model, tp, dense, attention] = MeasuredLayers(mixed, roofline)
    return halves


def errors(degrees: tuple = DEGREES, held_out: bool = True) -> list[dict]:
    """One row per point of `degrees` and model ("roofline"; "profile", held out, unless `held_out` is
    false): the relative error of each part and of the whole layer."""
    halves = build_halves(degrees) if held_out else {}
    lines = {(d, m, tp): Roofline(server(d), load_model(m), tp) for d in DEVICES for m in MODELS for tp in degrees}
    previous = {(d, m): Roofline(dataclasses.replace(server(d), gpu=dataclasses.replace(server(d).gpu, **PREVIOUS)),
                                 load_model(m)) for d in DEVICES for m in MODELS}
    rows = []
    for point in (p for p in points() if p.tp in degrees):
        measured = point.parts | {"whole": point.whole}
        predicted = {"roofline": roofline_parts(point, lines[point.device, point.model, point.tp]),
                     "profile": held_out_parts(point, halves) if held_out else None,
                     "previous": roofline_parts(point, previous[point.device, point.model]) if point.tp == 1 else None}
        for source, parts in predicted.items():
            if parts is None:
                continue
            rows.append(dict(source=source, device=point.device, model=point.model, tp=point.tp, regime=point.regime,
                             measured_attention=point.has_attention,
                             **{k: parts[k] / measured[k] - 1 for k in parts if measured.get(k)}))
    return rows


def summary(rows: list[dict], key, part: str = "whole") -> dict:
    """key(row) -> (mean |error|, worst |error|, points) of `part` over the rows that have it."""
    groups = defaultdict(list)
    for row in rows:
        if part in row:
            groups[key(row)].append(abs(row[part]))
    return {k: (float(np.mean(v)), float(np.max(v)), len(v)) for k, v in groups.items()}


def cell(stats) -> str:
    return "-" if stats is None else f"{stats[0]:.1%} / {stats[1]:.1%} ({stats[2]})"


def print_tables(rows: list[dict]) -> None:
    head = "| | " + " | ".join(REGIMES) + " |\n|---|" + "---|" * len(REGIMES)
    print("Whole layer, one GPU (tp = 1), mean / worst |error| (points): the previous roofline, the fitted roofline "
          "defaults, the profile-driven model held out\n")
    print("| profile | model | " + " | ".join(REGIMES) + " |\n|---|---|" + "---|" * len(REGIMES))
    for device in DEVICES:
        for model in MODELS:
            for attention in (False, True):
                for source in SOURCES:
                    stats = summary([r for r in rows if r["tp"] == 1 and r["measured_attention"] == attention],
                                    lambda r: (r["source"], r["device"], r["model"], r["regime"]))
                    got = [stats.get((source, device, model, regime)) for regime in REGIMES]
                    if any(got):
                        what = "with attention" if attention else "without attention"
                        print(f"| {device} {model} {what} | {source} | " + " | ".join(map(cell, got)) + " |")
    for title, selected in (("one GPU", lambda r: r["tp"] == 1), ("every degree (1, 2, 4, 8 GPUs)", lambda r: True)):
        print(f"\nWhole layer over every shipped profile, {title}: mean / worst |error| (points)\n")
        print(head.replace("| |", "| model |", 1))
        stats = summary([r for r in rows if selected(r)], lambda r: (r["source"], r["regime"]))
        for source in SOURCES if title == "one GPU" else SOURCES[1:]:
            print(f"| {source} | " + " | ".join(cell(stats.get((source, regime))) for regime in REGIMES) + " |")
    print("\nBy part of the layer, every profile and degree: mean / worst |error| (points)\n")
    print("| part | model | " + " | ".join(REGIMES) + " |\n|---|---|" + "---|" * len(REGIMES))
    for part in PARTS:
        stats = summary([r for r in rows if r["source"] != "previous"], lambda r: (r["source"], r["regime"]), part)
        for source in SOURCES[1:]:
            print(f"| {part} | {source} | " + " | ".join(cell(stats.get((source, regime))) for regime in REGIMES) + " |")
    print("\nWhole layer by number of GPUs, every profile: mean / worst |error| (points)\n")
    print("| GPUs | model | " + " | ".join(REGIMES) + " |\n|---|---|" + "---|" * len(REGIMES))
    stats = summary(rows, lambda r: (r["source"], r["tp"], r["regime"]))
    for tp in DEGREES:
        for source in ("roofline", "profile"):
            print(f"| {tp} | {source} | " + " | ".join(cell(stats.get((source, tp, regime))) for regime in REGIMES) + " |")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)  # half a profile extends its fit past the other half's
        rows = errors()
    print_tables(rows)


if __name__ == "__main__":
    main()
