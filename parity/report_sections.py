"""The sections of a report and their verdicts, each computed from the report's stored data.

Module rows are judged again against their tolerance entries (pure relative-L2 bounds); every
other row keeps the verdict the check gave it (its tolerance decided with element-wise data the
report does not store).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from . import report_plots as plots
from .report_render import (FAIL, INCONCLUSIVE, NOT_RUN, PASS, Data, Image, Section, Table,
                            count, frame, is_true, number, rel_l2_limit, status)

# The project's speed and memory targets for a port (requirements, not measurements): Jittor
# may take at most this many times PyTorch's time and peak resident memory on each task.
BENCH_LIMITS = {"time_ratio": 2.0, "mem_ratio": 2.0}
MODULE_KINDS = ("module", "module.accumulated", "buffer", "buffer.accumulated")
TRAINING_KINDS = ("loss", "grad", "step", "ema", "buffer.step")
PER_TENSOR_KINDS = {"grad": "gradients", "step": "optimizer step (weights, moments, updates)",
                    "ema": "EMA", "buffer.step": "BatchNorm buffers after a step"}
WORST_PER_KIND = 8


def _first(rows: pd.DataFrame, label: str = "path") -> str:
    if rows.empty:
        return ""
    r = rows.iloc[0]
    return f"{r[label]}: {r['reason']}" if r["reason"] else str(r[label])


def _check_rows(d: Data, kinds: tuple[str, ...]) -> pd.DataFrame:
    checks = d.table("checks")
    if checks is None or checks.empty:
        return pd.DataFrame(columns=["kind", "path", "passed", "reason"])
    return checks[checks["kind"].isin(kinds)]


def _why(d: Data, part: str, default: str) -> str:
    """Why a part (``training.trajectory``, else its whole part ``training``) did not run for
    this port (``meta.not_run``), else ``default``."""
    not_run = d.meta.get("not_run") or {}
    why = not_run.get(part) or not_run.get(part.split(".")[0])
    return f"{default.split(' did not run')[0]} did not run: {why}" if why else default


def section_port(d: Data) -> Section:
    """Another port's weights against the official layout, and how its modules were paired."""
    s = Section("port", "Port under test")
    port = d.meta.get("provenance", {}).get("port") or {}
    findings = d.meta.get("findings")
    if findings is None:
        s.verdict = PASS
        s.compared = f"{port.get('spec', 'jittor_impl')}: the official names, loaded strictly"
        return s
    problems = len(findings["missing"]) + len(findings["unexpected"]) + len(findings["misshaped"])
    same_count = findings["official_parameters"] == findings["port_parameters"]
    s.verdict = PASS if problems == 0 and same_count else FAIL
    s.compared = (f"{port.get('spec')}: {len(findings['loaded'])} official tensors loaded by name; "
                  f"{len(findings['missing'])} missing, {len(findings['unexpected'])} unexpected, "
                  f"{len(findings['misshaped'])} mis-shaped; parameters {findings['port_parameters']:,}"
                  f" (official {findings['official_parameters']:,})")
    first = (findings["missing"] or findings["unexpected"]
             or [m[0] for m in findings["misshaped"]] or [])
    s.first_failure = (first[0] if first else "" if same_count else "parameter count")
    rows = ([{"finding": "missing", "official": k, "port": "", "shapes": ""}
             for k in findings["missing"][:20]]
            + [{"finding": "unexpected", "official": "", "port": k, "shapes": ""}
               for k in findings["unexpected"][:20]]
            + [{"finding": "mis-shaped", "official": a, "port": b, "shapes": f"{list(x)} vs {list(y)}"}
               for a, b, x, y in findings["misshaped"][:20]])
    s.blocks.append([f"Port: `{port.get('spec')}` from `{port.get('file')}`"
                     + (f", commit `{port.get('commit')}`" + (" (dirty)" if port.get("dirty") else "")
                        if port.get("commit") else ""),
                     f"Key map: `{port.get('key_map')}` ({port.get('renamed_keys')} names)"])
    if rows:
        s.blocks.append(Table(frame(rows), "State-dict findings (up to 20 of each):"))
    if findings.get("suggested"):
        s.blocks.append(f"A key map pairing {len(findings['suggested'])} names by module tree, "
                        "order and shape was suggested (`suggested_key_map_<variant>.json` of "
                        "`rtdetr-parity check --port ...`): review it, then pass it with --key-map.")
    pairing = d.meta.get("module_pairing") or []
    if pairing:
        s.blocks.append(Table(frame([{k: str(v) for k, v in p.items()} for p in pairing]),
                              "Modules paired with the reference's, by method:"))
    not_run = d.meta.get("not_run") or {}
    if not_run:
        s.blocks.append([f"Not run: {k}: {v}" for k, v in not_run.items()])
    return s


def section_outputs(d: Data) -> Section:
    s = Section("outputs", "Outputs and detections")
    rows = _check_rows(d, ("output", "detection"))
    s.thresholds = d.tols.rows(("output", "detection"))
    if rows.empty:
        s.verdict, s.compared = NOT_RUN, "the outputs part did not run"
        return s
    failed = rows[~is_true(rows["passed"])]
    s.verdict = PASS if failed.empty else FAIL
    sizes = d.meta["sizes"]
    s.compared = (f"{len(rows)} eval outputs and postprocessed detections at {_size(sizes['eval'])}, "
                  f"{len(failed)} failed")
    s.first_failure = _first(failed)
    s.blocks.append(Table(frame([{"kind": r.kind, "path": r.path, "shape": r.shape_ref,
                                  "max abs": number(r.max_abs), "rel L2": number(r.rel_l2),
                                  "cosine": number(r.cosine, 9),
                                  "status": status(r.passed, r.reason)}
                                 for r in rows.itertuples()])))
    notes = d.meta.get("notes") or []
    if notes:
        s.blocks += ["What the check noted (forced decisions, re-paired detections):", notes]
    return s


def _size(size: Any) -> str:
    return "x".join(map(str, size)) if isinstance(size, list) else f"{size}x{size}"


def judged_modules(d: Data) -> pd.DataFrame:
    """The module rows with ``ok``: the check's verdict, and for rows under a pure
    relative-L2 entry also that bound applied to the stored error."""
    rows = d.table("modules")
    if rows is None or rows.empty:
        return pd.DataFrame(columns=["pass", "module", "mode", "kind", "path", "rel_l2", "cosine",
                                     "passed", "reason", "start", "end", "ok", "why"])
    rows = rows.copy()
    ok, why = [], []
    for r in rows.to_dict("records"):
        good, text = str(r["passed"]) == "True", str(r["reason"])
        limit = (rel_l2_limit(d.tols, r["kind"], f"{r['pass']}:{r['path']}")
                 if r["kind"] in MODULE_KINDS else None)
        if limit is not None and good:
            rel, cos = float(r["rel_l2"]), float(r["cosine"])
            if not rel <= limit[0]:
                good, text = False, f"rel L2 {rel:.3g} > {limit[0]:g}"
            elif not cos >= limit[1]:
                good, text = False, f"cosine {cos:.8f} < {limit[1]:g}"
        ok.append(good)
        why.append(text)
    rows["ok"], rows["why"] = ok, why
    return rows


def first_divergence(rows: pd.DataFrame) -> pd.Series | None:
    """The failing structure row, else the failing isolated row of the call that returned
    first (the innermost failing module), as :attr:`parity.modules.ModuleReport.first_failure`."""
    failing = rows[~rows["ok"] & rows["mode"].isin(["structure", "isolated"])]
    if failing.empty:
        return None
    order = failing.assign(_s=(failing["mode"] != "structure").astype(int)).sort_values(
        ["_s", "end"], kind="stable")
    return order.iloc[0]


def _param_counts(d: Data, modules: list[str]) -> dict[str, tuple[int, int]]:
    params = d.table("parameters")
    if params is None or params.empty:
        return {}
    names = params["name"].tolist()
    torch_n, jittor_n = params["torch"].tolist(), params["jittor"].tolist()
    out = {}
    for module in modules:
        base = module.split("#", 1)[0]
        prefix = "" if base.startswith("(") else f"{base}."  # "(model)": the whole model
        picked = [i for i, n in enumerate(names) if n.startswith(prefix)]
        out[module] = (sum(int(torch_n[i]) for i in picked), sum(int(jittor_n[i]) for i in picked))
    return out


def section_modules(d: Data) -> Section:
    s = Section("modules", "Module map")
    s.thresholds = d.tols.rows(MODULE_KINDS)
    rows = judged_modules(d)
    if rows.empty:
        s.verdict, s.compared = NOT_RUN, _why(d, "modules", "the modules part did not run")
        return s
    passes = list(dict.fromkeys(rows["pass"]))
    failed = rows[~rows["ok"]]
    s.verdict = PASS if failed.empty else FAIL
    per_pass = []
    firsts: dict[str, str | None] = {}
    for name in passes:
        sub = rows[rows["pass"] == name]
        first = first_divergence(sub)
        firsts[name] = None if first is None else first["module"]
        per_pass.append(f"{name}: {sub['module'].nunique()} module calls, {len(sub)} rows, "
                        f"{int((~sub['ok']).sum())} failed")
        if first is not None and not s.first_failure:
            s.first_failure = f"{name}: {first['path']} {first['mode']} [{first['kind']}]: {first['why']}"
    if failed.size and not s.first_failure:
        r = failed.iloc[0]
        s.first_failure = f"{r['pass']}: {r['path']} {r['mode']} [{r['kind']}]: {r['why']}"
    runs = d.table("module_runs")
    shapes = ({r["pass"]: r["input_shape"] for r in runs.to_dict("records")}
              if runs is not None else {})
    s.compared = "; ".join(f"{p} ({shapes.get(p.split(':')[0], '?')})" for p in per_pass)

    # One row per module call: its largest error of each kind in each pass.
    table = []
    order = rows.groupby("module", sort=False)["start"].min()
    modules = sorted(order.index, key=lambda m: (order[m], m))
    counts = _param_counts(d, modules)
    keys = ["pass", "module"]
    ok_of = rows.groupby(keys)["ok"].all().to_dict()
    start_of = rows.groupby(keys)["start"].min().to_dict()
    rel = pd.to_numeric(rows["rel_l2"], errors="coerce")
    iso_of = rel[rows["kind"] == "module"].groupby([rows["pass"], rows["module"]]).max().to_dict()
    acc_of = rel[rows["kind"] == "module.accumulated"].groupby(
        [rows["pass"], rows["module"]]).max().to_dict()
    depth = []
    for module in modules:
        line = {"order": count(order[module]), "module": module,
                "params torch": count(counts.get(module, ("", ""))[0]),
                "params jittor": count(counts.get(module, ("", ""))[1])}
        ok = True
        for name in passes:
            key = (name, module)
            iso, acc = iso_of.get(key, math.nan), acc_of.get(key, math.nan)
            if key in ok_of:
                ok &= bool(ok_of[key])
                depth.append({"pass": name, "order": float(start_of[key]), "module": module,
                              "isolated": iso, "accumulated": acc})
            line[f"{name} isolated"] = number(iso)
            line[f"{name} accumulated"] = number(acc)
        line["status"] = "ok" if ok else "FAIL"
        table.append(line)
    limits = {}
    for name in passes:
        iso = rel_l2_limit(d.tols, "module", f"{name}:")
        acc = rel_l2_limit(d.tols, "module.accumulated", f"{name}:")
        limits[name] = {k: v[0] for k, v in (("isolated", iso), ("accumulated", acc)) if v}
    plots.module_depth(pd.DataFrame(depth), firsts, limits, d.folder / "module_depth.png")
    mismatched = [m for m in modules if counts.get(m, (0, 0))[0] != counts.get(m, (0, 0))[1]]
    s.blocks += [
        "Every module call of the forward, in execution order. Isolated: the module fed the "
        "reference's inputs, its children answered with the reference's outputs (its own error). "
        "Accumulated: the module inside the whole Jittor forward (the error it inherits). Both "
        "are relative L2 against the reference; status judges every leaf, buffer and decision of "
        "the call.",
        Image("module_depth.png", "error along the network depth: accumulated vs isolated"),
        f"Parameter counts (elements under the module's state-dict prefix) differ in "
        f"{len(mismatched)} modules" + (f": {', '.join(mismatched[:10])}" if mismatched else "."),
    ]
    failed_rows = failed.head(30)
    if not failed_rows.empty:
        s.blocks.append(Table(frame([{"pass": r["pass"], "path": r["path"], "mode": r["mode"],
                                      "kind": r["kind"], "rel L2": number(r["rel_l2"]), "why": r["why"]}
                                     for r in failed_rows.to_dict("records")]),
                              f"Failing rows ({len(failed)}; first 30):"))
    s.blocks.append(Table(frame(table), f"{len(table)} module calls:"))
    return s


def section_decisions(d: Data) -> Section:
    s = Section("decisions", "Decisions")
    s.thresholds = d.tols.rows(("decision", "decision.forced", "decision.band"))
    rows = _check_rows(d, ("decision",))
    labels = _check_rows(d, ("detection",))
    labels = labels[labels["path"].str.endswith(".labels")] if not labels.empty else labels
    if rows.empty:
        why = (d.meta.get("not_run") or {}).get("decisions")
        s.verdict, s.compared = NOT_RUN, (f"no decision was compared: {why}" if why else
                                          "no decision was compared (the outputs part did not run)")
        return s
    failed = rows[~is_true(rows["passed"])]
    s.verdict = PASS if failed.empty else FAIL
    total = pd.to_numeric(rows["compared"], errors="coerce").sum()
    flipped = pd.to_numeric(rows["flipped"], errors="coerce").sum()
    forced = pd.to_numeric(rows["forced"], errors="coerce").sum()
    s.compared = (f"{len(rows)} decision rows over {int(total)} decisions: {int(flipped)} set "
                  f"differently by the port, {int(forced)} forced to the reference's; "
                  f"{len(failed)} rows failed")
    s.first_failure = _first(failed)
    s.blocks += [
        "Top-k query selection, Hungarian matches per decoder layer, denoising groups, ReLU gates, "
        "bilinear sampling cells and L1 signs. A decision the port sets differently passes only "
        "inside its tie band (the reference's own fp32 error of the quantity decided); there the "
        "reference's choice is forced into the port so the comparisons downstream see the same "
        "decision. Train-mode decisions appear once per check that runs a train forward: the "
        "loss check (top-k, denoising groups, matches), then the gradient check and the "
        "optimizer-step check (each with every counted kink).",
        Table(frame([{"decision": r.path, "compared": count(r.compared), "flipped": count(r.flipped),
                      "forced": count(r.forced), "band": number(r.band),
                      "largest gap": number(r.max_abs), "status": status(r.passed, r.reason)}
                     for r in rows.itertuples()])),
    ]
    if not labels.empty:
        agree = [{"detections": r.path, "compared": count(r.compared), "flipped": count(r.flipped),
                  "status": status(r.passed, r.reason)} for r in labels.itertuples()]
        s.blocks.append(Table(frame(agree), "Detections agreement (labels after re-pairing ties):"))
    return s


def section_training(d: Data) -> Section:
    s = Section("training", "Losses, gradients, optimizer step, EMA, BatchNorm buffers")
    s.thresholds = d.tols.rows(TRAINING_KINDS + ("noise", "noise.loss", "noise.zero", "grad.zero",
                                                  "grad.zero64", "update.rounding"))
    rows = _check_rows(d, TRAINING_KINDS)
    if rows.empty:
        s.verdict, s.compared = NOT_RUN, _why(d, "training", "the outputs and training parts "
                                                             "did not run")
        return s
    failed = rows[~is_true(rows["passed"])]
    s.verdict = PASS if failed.empty else FAIL
    by_kind = rows.groupby("kind", sort=False)
    s.compared = ", ".join(f"{len(g)} {k} rows" for k, g in by_kind) + f"; {len(failed)} failed"
    s.first_failure = _first(failed)
    loss_factor = d.tols.factor("noise.loss", "")
    losses = rows[rows["kind"] == "loss"]
    loss_table = []
    for r in losses.itertuples():
        floor = pd.to_numeric(pd.Series([r.precision_floor]), errors="coerce").iloc[0]
        ratio = float(r.rel_l2) / floor if floor and floor > 0 else math.nan
        loss_table.append({"term": r.path, "rel diff": number(r.rel_l2), "max abs": number(r.max_abs),
                           "fp32 floor": number(floor), "diff / floor": number(ratio, 2),
                           "status": status(r.passed, r.reason)})
    s.blocks += [
        f"Each loss term's relative difference beside its fp32 floor (the reference's own fp32 "
        f"error against its float64 recomputation); a term may differ by the tolerance or "
        f"{number(loss_factor)} x the largest floor. `train_loss.*` rows are the gradient "
        "check's forward at the training size.",
        Table(frame(loss_table), "Loss terms:")]
    summary, worst = [], []
    for kind, what in PER_TENSOR_KINDS.items():
        g = rows[rows["kind"] == kind]
        if g.empty:
            continue
        rel = pd.to_numeric(g["rel_l2"], errors="coerce")
        top = g.assign(_r=rel.fillna(-1)).sort_values("_r", ascending=False, kind="stable")
        bad = g[~is_true(g["passed"])]
        summary.append({"kind": kind, "what": what, "tensors": str(len(g)),
                        "failed": str(len(bad)), "largest rel L2": number(rel.max()),
                        "of": top.iloc[0]["path"] if len(top) else ""})
        worst += [{"kind": kind, "tensor": r.path, "rel L2": number(r.rel_l2),
                   "cosine": number(r.cosine, 9), "status": status(r.passed, r.reason)}
                  for r in top.head(WORST_PER_KIND).itertuples()]
    s.blocks += [Table(frame(summary), "Per-tensor checks (every row is in data/checks.csv):"),
                 Table(frame(worst), f"The {WORST_PER_KIND} largest errors of each kind:")]
    ratios, counts = {}, []
    for label, prefix in (("gradients", "grad."), ("updates", "update.")):
        factor = d.tols.factor("noise", prefix)
        g = rows[rows["path"].str.startswith(prefix)]
        floor = pd.to_numeric(g["precision_floor"], errors="coerce")
        ratio = (pd.to_numeric(g["rel_l2"], errors="coerce") / floor.where(floor > 0)).dropna()
        if not ratio.empty:
            ratios[label] = (ratio, factor)
            counts.append(f"{label}: {int((ratio <= (factor or math.inf)).sum())} of "
                          f"{len(ratio)} within {number(factor)} x")
    drift = d.table("drift")
    if drift is not None and not drift.empty:
        ratio = (drift["drift"] / drift["floor"].where(drift["floor"] > 0)).dropna()
        factor = d.tols.factor("noise", "trajectory")
        ratios["trajectory weights"] = (ratio, factor)
        counts.append(f"trajectory weights (every parameter after every step): "
                      f"{int((ratio <= (factor or math.inf)).sum())} of {len(ratio)} within "
                      f"{number(factor)} x")
    if ratios:
        plots.error_over_floor(ratios, "every parameter: port error / reference's own fp32 "
                               "error (rel L2 vs float64 replay)", d.folder / "error_floor.png")
        s.blocks += [
            "Error over floor, every parameter: the port's rel L2 against the reference, over "
            "the reference's own fp32 rel L2 against its float64 replay (" + "; ".join(counts)
            + "). A parameter past the factor can still pass under its fixed rel-L2 entry; "
            "zero-in-exact-arithmetic gradients are judged by norm and have no floor here.",
            Image("error_floor.png", "histogram of error / fp32 floor over all parameters")]
    return s


def section_trajectory(d: Data) -> Section:
    s = Section("trajectory", "Trajectory")
    s.thresholds = d.tols.rows(("trajectory", "decision.count")) + [
        r for r in d.tols.rows(("noise",)) if "trajectory" in str(r["path"]) or "loss" in str(r["path"])]
    steps = d.table("trajectory")
    rows = _check_rows(d, ("trajectory",))
    if steps is None or steps.empty:
        s.verdict, s.compared = NOT_RUN, _why(d, "training.trajectory",
                                              "the trajectory did not run")
        return s
    failed = rows[~is_true(rows["passed"])]
    s.verdict = PASS if failed.empty else FAIL
    info = d.meta.get("trajectory") or {}
    s.compared = (f"{len(steps)} training steps of both frameworks from one state at "
                  f"{_size(info.get('size', '?'))}, batch {info.get('batch', '?')}: {len(rows)} rows, "
                  f"{len(failed)} failed")
    s.first_failure = _first(failed)
    plots.trajectory(steps, d.folder / "trajectory.png")
    s.blocks += [Image("trajectory.png", "per-step loss of torch, jittor and the float64 replay"),
                 Table(frame([{"step": count(r.step), "torch loss": number(r.torch_loss, 8),
                               "jittor loss": number(r.jittor_loss, 8),
                               "float64 loss": number(r.float64_loss, 8),
                               "rel diff": number(r.loss_rel_diff), "fp32 floor": number(r.loss_floor),
                               "weights rel L2": number(r.weights_rel_l2),
                               "worst parameter": f"{r.max_param} ({number(r.max_param_rel_l2)})",
                               "tie flips": count(r.tie_flips), "forced": count(r.tie_forced)}
                              for r in steps.itertuples()]))]
    if not failed.empty:
        s.blocks.append(Table(frame([{"row": r.path, "status": status(r.passed, r.reason)}
                                     for r in failed.itertuples()]), "Failing rows:"))
    return s


def section_nightly(d: Data) -> Section:
    s = Section("training-comparison", "Training comparison")
    info = d.meta.get("nightly", {})
    summary_path = d.folder / "data" / "nightly_summary.json"
    runs, curves = d.table("nightly_runs"), d.table("nightly_curves")
    if info.get("state") != "run" or not summary_path.is_file() or runs is None:
        s.verdict, s.compared = NOT_RUN, info.get("why", "no nightly result")
        return s
    summary = json.loads(summary_path.read_text())
    verdict = summary.get("verdict")
    s.verdict = {"equivalent": PASS, "inconclusive": INCONCLUSIVE}.get(verdict, FAIL)
    profile = summary.get("profile", {})
    s.compared = (f"AP of {summary.get('n')} seeds per framework, profile {profile.get('name')} "
                  f"({profile.get('what', '')}): {summary.get('verdict_line')}")
    if s.verdict == FAIL:
        s.first_failure = f"AP verdict {verdict}: {summary.get('verdict_line')}"
    s.thresholds = [{"rule": summary.get("rule"), "margin_ap_points": summary.get("margin_ap_points"),
                     "alpha": summary.get("alpha"), "min_seeds": summary.get("min_seeds")}]
    if curves is not None and not curves.empty:
        plots.training_comparison(curves, f"{profile.get('name')} profile: "
                                  f"{summary.get('verdict_line')}", d.folder / "training.png")
        s.blocks.append(Image("training.png", "loss curves and AP per epoch of both frameworks"))
    pivot = runs.pivot_table(index="seed", columns="role", values="AP", aggfunc="first")
    table = []
    for seed, r in pivot.iterrows():
        line = {"seed": count(seed)}
        for role in pivot.columns:
            line[f"AP {role}"] = number(r[role], 4)
        if "jittor" in pivot.columns and "torch" in pivot.columns:
            line["jittor - torch"] = number(r["jittor"] - r["torch"], 3)
        table.append(line)
    control = summary.get("control") or {}
    effect = summary.get("equivalence", {}).get("effect", {})
    s.blocks += [
        f"Rule: {summary.get('rule')}",
        f"Noise: the per-seed AP differences have sd {number(effect.get('sd'))} points; the torch "
        f"control ({control.get('what', 'none')}) differs from torch by sd "
        f"{number(control.get('ap_diff_sd'))} points.",
        Table(frame(table), f"Final AP per seed (source: {info.get('source')}):")]
    return s


def time_ratio_range(times: pd.DataFrame | None, task: pd.Series) -> tuple[float, float]:
    """The most and least favourable Jittor/torch time ratios over ``task``'s timed runs
    (fastest Jittor run over slowest torch run, and the reverse); NaN without the runs."""
    if times is None or times.empty:
        return math.nan, math.nan
    mine = times[(times["task"] == task["task"]) & (times["variant"] == task["variant"])
                 & (times["batch"] == task["batch"]) & (times["size"] == task["size"])]
    th = mine.loc[mine["framework"] == "torch", "seconds"]
    jt = mine.loc[mine["framework"] == "jittor", "seconds"]
    if th.empty or jt.empty:
        return math.nan, math.nan
    return jt.min() / th.max(), jt.max() / th.min()


def section_bench(d: Data) -> Section:
    s = Section("speed-and-memory", "Speed and memory")
    s.thresholds = [{"jittor / torch time at most": BENCH_LIMITS["time_ratio"],
                     "jittor / torch peak RSS at most": BENCH_LIMITS["mem_ratio"],
                     "time ratio of": "each framework's best timed run",
                     "undecided when": "the timed runs' spread allows ratios on both sides of "
                                       "the time limit (fastest Jittor over slowest torch, "
                                       "slowest Jittor over fastest torch)"}]
    rows, info = d.table("bench"), d.meta.get("bench", {})
    if rows is None or rows.empty:
        s.verdict, s.compared = NOT_RUN, info.get("why", "no benchmark")
        return s
    rows = rows.copy()
    bounds = [time_ratio_range(d.table("bench_times"), r) for _, r in rows.iterrows()]
    rows["ratio_low"] = [b[0] for b in bounds]
    rows["ratio_high"] = [b[1] for b in bounds]
    limit = BENCH_LIMITS["time_ratio"]
    # a limit crossed beyond the runs' spread fails; one the spread straddles is undecided
    over_time = (rows["time_ratio"] > limit) & ~(rows["ratio_low"] <= limit)
    over = rows[over_time | (rows["mem_ratio"] > BENCH_LIMITS["mem_ratio"])]
    undecided = rows[~rows.index.isin(over.index)
                     & ((rows["time_ratio"] > limit) | (rows["ratio_high"] > limit))]
    s.verdict = FAIL if not over.empty else INCONCLUSIVE if not undecided.empty else PASS
    s.compared = (f"{len(rows)} tasks ({info.get('plan')} benchmark: {info.get('reps')} timed runs "
                  f"after {info.get('warmup')} warm-up runs, each framework in its own process; "
                  f"machine load average {number(info.get('load_average_before'))} before, "
                  f"{number(info.get('load_average_after'))} after); worst time ratio (best runs) "
                  f"{number(rows['time_ratio'].max(), 3)} (runs' range up to "
                  f"{number(rows['ratio_high'].max(), 3)}), worst memory ratio "
                  f"{number(rows['mem_ratio'].max(), 3)}")
    if not over.empty:
        r = over.iloc[0]
        s.first_failure = (f"{r['task']} {r['variant']} batch {r['batch']} @ {r['size']}: time ratio "
                           f"{r['time_ratio']:.2f} (runs' range {r['ratio_low']:.2f} to "
                           f"{r['ratio_high']:.2f}), memory ratio {r['mem_ratio']:.2f}")
    elif not undecided.empty:
        r = undecided.iloc[0]
        s.first_failure = (f"undecided: {r['task']} {r['variant']} batch {r['batch']} @ {r['size']}: "
                           f"time ratio {r['time_ratio']:.2f}, runs' range {r['ratio_low']:.2f} to "
                           f"{r['ratio_high']:.2f} against the limit {limit:g}: time it again on a "
                           f"quieter machine")
    plots.bench(rows, d.folder / "bench.png")
    s.blocks += [
        "Times are seconds per run (an eval forward, or a training step with the optimizer); "
        "the ratio judged is of each framework's best run, the one least disturbed by other "
        "work on the machine; the range beside it runs from the fastest Jittor run over the "
        "slowest torch run to the reverse, and a limit inside it leaves the task undecided; "
        "medians beside it. Peak RSS is each framework's process alone. "
        "Every timed run is in data/bench_times.csv.",
        Table(frame([{"task": r.task, "variant": r.variant, "batch": count(r.batch),
                      "size": count(r.size), "torch best s": number(r.torch_min_s),
                      "jittor best s": number(r.jittor_min_s), "J/T time": number(r.time_ratio, 3),
                      "J/T range": f"{number(r.ratio_low, 3)} to {number(r.ratio_high, 3)}",
                      "torch median s": number(r.torch_median_s),
                      "jittor median s": number(r.jittor_median_s),
                      "J/T median": number(r.median_ratio, 3),
                      "torch peak MiB": number(r.torch_peak_mb, 4),
                      "jittor peak MiB": number(r.jittor_peak_mb, 4),
                      "J/T memory": number(r.mem_ratio, 3)} for r in rows.itertuples()])),
        Image("bench.png", "time and peak memory of both frameworks per task")]
    return s


def section_faults(d: Data) -> Section:
    s = Section("fault-catalogue", "Fault catalogue")
    s.thresholds = [{"rule": "every injected porting bug is caught by a check row (a crash of "
                             "the patched port counts as missed)"}]
    rows, info = d.table("faults"), d.meta.get("faults", {})
    if rows is None or rows.empty:
        s.verdict, s.compared = NOT_RUN, info.get("why", "no fault table")
        return s
    caught = is_true(rows["caught"]) & ~rows["caught_by"].astype(str).str.startswith("error:")
    s.verdict = PASS if caught.all() else FAIL
    where = ("run now" if info.get("state") == "run" else f"stored table {info.get('source')}")
    s.compared = f"{int(caught.sum())} of {len(rows)} injected faults caught ({info.get('tier')} tier, {where})"
    if not caught.all():
        r = rows[~caught].iloc[0]
        s.first_failure = f"{r['id']} not caught ({r['caught_by'] or 'no failing row'})"
    s.blocks.append(Table(frame([{"fault": r.id, "area": r.area, "what": r.what,
                                  "caught": "yes" if ok else "NO", "first catching row": r.caught_by,
                                  "failing rows": count(r.failed_rows)}
                                 for r, ok in zip(rows.itertuples(), caught)])))
    return s


def section_divergences(d: Data) -> Section:
    s = Section("known-divergences", "Known divergences and framework differences")
    rows = d.table("known_divergences")
    diffs = d.table("framework_differences")
    s.thresholds = [{"rule": "rows a tolerance-resolved divergence covers pass; xfail rows are "
                             "reported, not judged"}]
    applying = rows[is_true(rows["applies"])] if rows is not None and not rows.empty else pd.DataFrame()
    broken = (applying[(applying["resolution"] != "xfail")
                       & (pd.to_numeric(applying["rows_failed"]) > 0)] if not applying.empty else applying)
    s.verdict = PASS if broken.empty else FAIL
    s.compared = (f"{len(applying)} of {0 if rows is None else len(rows)} known divergences apply to "
                  f"{d.meta['variant']} under this run's conditions; "
                  f"{0 if diffs is None else len(diffs)} framework differences documented in jittor_impl/")
    if not broken.empty:
        s.first_failure = f"{broken.iloc[0]['id']}: {broken.iloc[0]['rows_failed']} covered rows fail"
    if rows is not None and not rows.empty:
        s.blocks.append(Table(frame([{"id": r.id, "variant": r.variant, "kind": r.kind, "path": r.path,
                                      "handled by": r.resolution, "measured at": r.conditions,
                                      "applies here": number(r.applies), "rows here": count(r.rows),
                                      "failing here": count(r.rows_failed), "why": r.reason}
                                     for r in rows.itertuples()]),
                              "Known divergences (parity/known_divergences.json):"))
    if diffs is not None and not diffs.empty:
        shown = diffs.assign(difference=diffs["difference"].str.replace("``", "`", regex=False))
        s.blocks.append(Table(frame(shown.rename(columns={"difference": "how the port differs"})),
                              "Framework differences (the `Differences` list of each jittor_impl "
                              "module):"))
    return s


def section_tolerances(d: Data) -> Section:
    s = Section("tolerances", "Tolerances and noise derivation")
    table = d.tols.table
    noise = d.table("noise")
    about = d.meta.get("noise_derivation", {})
    s.blocks.append(Table(frame([{"kind": r.kind, "path contains": r.path, "atol": number(r.atol),
                                  "rtol": number(r.rtol), "max rel L2": number(r.max_rel_l2),
                                  "min cosine": number(r.min_cosine, 6), "why": r.why}
                                 for r in table.itertuples()]),
                          "The tolerance table (parity/tolerances.py); the first entry of a kind "
                          "whose path pattern the compared path contains applies:"))
    if noise is not None and not noise.empty:
        s.blocks += [
            f"Noise factors (`noise` entries): derived by `{about.get('command', 'rtdetr-parity noise')}`. "
            f"Rule: {about.get('rule', '')}",
            Table(frame([{"kind": r["kind"], "samples": count(r["samples"]), "p50": number(r["p50"]),
                          "p90": number(r["p90"]), "p99": number(r["p99"]),
                          "p99.9": number(r["p99.9"]), "max": number(r["max"]),
                          "factor": number(r["factor"])}
                         for r in noise.to_dict("records")]),
                  "Control error / reference floor, per kind:")]
    return s


def _shared_threads(meta: dict) -> str:
    """How the check shared the machine with the fault catalogue's worker, if it did."""
    each = (meta.get("faults") or {}).get("threads_each")
    return (f" (the check and the fault catalogue's worker side by side: {each} torch and "
            f"OpenMP thread{'s' if each != 1 else ''} each)") if each else ""


def section_provenance(d: Data) -> Section:
    s = Section("provenance", "Provenance")
    p, m = d.meta.get("provenance", {}), d.meta
    items = [f"Command: `{p.get('command', '')}`",
             f"Commit: `{p.get('git_commit')}`" + (f" (dirty: {p.get('git_dirty_files')} tracked files "
                                                  "modified)" if p.get("git_dirty") else " (clean)"),
             f"Measured at: {m.get('measured_at')}",
             f"Variant: {m.get('variant')}, {m.get('num_classes')} classes; weights "
             f"`{p.get('weights')}`, SHA-256 of the reference state dict `{p.get('weights_sha256')}`",
             "Sizes: " + ", ".join(f"{k} {_size(v)}" for k, v in m.get("sizes", {}).items())
             + f"; trajectory {number((m.get('trajectory') or {}).get('steps'))} steps",
             "Seeds: " + ", ".join(f"{k} {v}" for k, v in p.get("seeds", {}).items()),
             "Threads: " + ", ".join(f"{k} {v}" for k, v in p.get("threads", {}).items())
             + _shared_threads(m) + f"; Jittor kernels {p.get('jittor_kernels')}",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in p.get("machine", {}).items()),
             "Versions: " + ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()),
             "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in m.get("seconds", {}).items())]
    port = p.get("port")
    if port:
        items.append(f"Port: `{port.get('spec')}` ({port.get('file')}"
                     + (f", commit `{port.get('commit')}`{' dirty' if port.get('dirty') else ''}"
                        if port.get("commit") else "") + ")")
    s.blocks += [items, "Regenerate this report from its data (no model runs): "
                 "`rtdetr-parity report --from <this folder> --force`."]
    return s


SECTIONS = (section_port, section_outputs, section_modules, section_decisions, section_training,
            section_trajectory, section_nightly, section_bench, section_faults, section_divergences)
REFERENCE_SECTIONS = (section_tolerances, section_provenance)
