"""Reports from results files: Markdown plus a self-contained HTML page (images inlined as PNG).

``gradshield report RUN.db [RUN2.db ...] --out DIR`` writes ``DIR/report.md`` (with its PNG files
beside it) and ``DIR/report.html`` (one file: no external CSS, JS or images). Several runs are
shown side by side (e.g. vanilla vs GCM vs FGR). Contents: runs and their provenance, clean
accuracy, robust accuracy and AR per attack and budget, the worst case over attacks, robust
accuracy vs budget curves, clean / adversarial / perturbation images, the gradient-sign figure,
the gradient-masking verdict when the run has one, and the exact commands, versions and seeds.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradshield.errors import GradshieldError
from gradshield.evaluation.plots import figure_png, new_figure
from gradshield.evaluation.stats import paired as paired_counts
from gradshield.evaluation.stats import wilson
from gradshield.evaluation.store import RunResults, blob_array, load_run, open_results
from gradshield.evaluation.summary import attack_rows, compare_runs

MODE_NOTE = {
    "per-attack": "every attack ran on every clean-correct example: per-attack numbers are exact",
    "worst-case": ("attacks skipped examples an earlier attack had already broken (AutoAttack "
                   "style): per-attack columns show the cumulative robust accuracy after that "
                   "attack (marked *), the worst case is exact"),
}


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    # ("table", head, rows) | ("figure", Figure) | ("text", str) | ("code", str) | ("details", s, s)
    blocks: list = field(default_factory=list)


def _pct(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def pct(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def rate_cell(k: int, n: int) -> str:
    """``97.3 (96.1-98.2, n=866)``: percent with its 95 % Wilson interval and the count."""
    if n == 0:
        return "–"
    r = wilson(int(k), int(n))
    return f"{pct(r.value)} ({pct(r.low)}-{pct(r.high)}, n={n})"


def mask_cell(mask: np.ndarray, over: np.ndarray | None = None) -> str:
    """:func:`rate_cell` of a boolean mask (over the examples where ``over`` holds)."""
    if over is not None:
        mask = mask[over]
    return rate_cell(int(mask.sum()), int(mask.size))


def _num(value: float, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def run_names(runs: list[RunResults]) -> list[str]:
    names = [r.path.stem for r in runs]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


# --------------------------------------------------------------------------- sections


def overview(runs, names) -> Section:
    rows = []
    for name, run in zip(names, runs, strict=True):
        m = run.meta
        gcm = m.get("gcm")
        defense = m.get("defense") or (
            f"GCM at {gcm['at']} (w={gcm['w']:g}, eps={gcm['eps']:g})" if gcm else
            (f"modules marked for BPDA: {m['bpda_modules']}" if m.get("bpda_modules") else "none"))
        data = m.get("data") or {}
        rows.append([name, m.get("suite", "?"), str(m.get("checkpoint", "(in-process model)")),
                     (m.get("checkpoint_sha256") or m.get("model_fingerprint", ""))[:12],
                     defense,
                     f"{data.get('dataset', '?')} {data.get('split', '')}, {run.n} examples",
                     str(m.get("seed")), m.get("mode"),
                     "complete" if run.complete else
                     f"INCOMPLETE ({run.complete_batches}/{run.total_batches} batches)"])
    head = ["run", "suite", "checkpoint", "sha256/fingerprint", "defense", "data", "seed", "mode", "status"]
    s = Section("Runs", [("table", head, rows)])
    for mode in sorted({r.meta["mode"] for r in runs}):
        s.blocks.append(("text", f"Mode {mode}: {MODE_NOTE[mode]}."))
    return s


def headline(runs, names) -> Section:
    rows = []
    for name, run in zip(names, runs, strict=True):
        worst = run.worst_case()
        correct = run.clean_correct
        rows.append([name, mask_cell(correct), mask_cell(worst), mask_cell(worst, correct),
                     str(len(run.attacks))])
    return Section("Clean accuracy and worst case over all attacks", [
        ("table", ["run", "ACC", "worst-case robust accuracy", "worst-case AR", "attacks"], rows),
        ("text", "ACC: clean accuracy. Robust accuracy: share of all examples correct before and "
                 "after the attack. AR (attack robustness, RobustART/GCM paper): share of the "
                 "clean-correct examples that stay correct. Worst case: an example counts as robust "
                 "only if no attack of the suite broke it (the attacks differ in norm and budget). "
                 "Every rate: percent (95 % Wilson interval, number of examples).")])


def per_attack_table(runs, names, rows_by_run) -> Section:
    order: list[tuple[str, str, str]] = []
    seen = set()
    for run in runs:
        for att in run.attacks:
            if att["id"] not in seen:
                seen.add(att["id"])
                order.append((att["id"], att["family"], att["label"]))
    lookup = [{r["id"]: r for r in rows} for rows in rows_by_run]
    table = []
    for ident, family, label in order:
        row = [ident, family, label]
        for run, rows in zip(runs, lookup, strict=True):
            r = rows.get(ident)
            if r is None:
                row.append("–")
            elif run.meta["mode"] == "per-attack":
                a = next(i for i, att in enumerate(run.attacks) if att["id"] == ident)
                robust = run.robust(a)
                row.append(f"{mask_cell(robust)}; AR {mask_cell(robust, run.clean_correct)}")
            else:
                a = next(i for i, att in enumerate(run.attacks) if att["id"] == ident)
                row.append(f"{mask_cell(run.worst_case(range(a + 1)))}*")
        table.append(row)
    head = ["attack", "family", "budget"] + [f"{n}: RA; AR" for n in names]
    return Section("Robust accuracy per attack and budget", [
        ("table", head, table),
        ("text", "RA: robust accuracy over all examples; AR: over the clean-correct examples; each "
                 "with its 95 % Wilson interval and number of examples. * = cumulative robust "
                 "accuracy after this attack (worst-case mode).")])


def group_worst_case(runs, names) -> Section | None:
    table = []
    for name, run in zip(names, runs, strict=True):
        if run.meta["mode"] != "per-attack":  # sub-groups are not exact when attacks skipped examples
            continue
        groups = defaultdict(list)
        for a, att in enumerate(run.attacks):
            groups[(att["family"], att["label"])].append(a)
        for (family, label), members in groups.items():
            if len(members) > 1:
                worst = run.worst_case(members)
                ids = ", ".join(run.attacks[a]["id"] for a in members)
                table.append([name, family, label, ids, mask_cell(worst)])
    if not table:
        return None
    return Section("Worst case per budget (attacks sharing a family and budget)", [
        ("table", ["run", "family", "budget", "attacks", "worst-case RA"], table)])


def paired(runs, names) -> Section | None:
    """Runs on the same examples as the first: per attack, examples robust in only one of the two."""
    first = runs[0]
    table = []
    for name, run in zip(names[1:], runs[1:], strict=True):
        if run.meta.get("data_fingerprint") != first.meta.get("data_fingerprint"):
            continue
        for row in compare_runs(first, run)["attacks"]:
            test = paired_counts(row["only_a_robust"], row["only_b_robust"], first.n)
            table.append([row["id"], f"{names[0]} vs {name}", _pct(row["a_robust_accuracy"]),
                          _pct(row["b_robust_accuracy"]), str(row["only_a_robust"]),
                          str(row["only_b_robust"]),
                          f"{100 * test.difference:+.1f} ({100 * test.low:+.1f} to "
                          f"{100 * test.high:+.1f})", f"{test.p_value:.2g}"])
    if not table:
        return None
    return Section("Paired comparison on the same examples", [
        ("table", ["attack", "runs", "RA first", "RA other", "robust only in first",
                   "robust only in other", "difference, points (95 % CI)", "McNemar p"], table),
        ("text", "Counts of examples (same data, same attack id) that one run keeps robust and the "
                 "other does not; McNemar's exact test of equal robust accuracy on them (p < 0.05: "
                 "a difference beyond noise). For a worst-case-mode run: robust to this and all "
                 "earlier attacks.")])


def attack_details(runs, names, rows_by_run) -> Section:
    s = Section("Attack details")
    for name, rows in zip(names, rows_by_run, strict=True):
        table = [[r["id"], r["kind"], r["through"], _num(r["eps"]), str(r["attacked"]),
                  _pct(r["success_rate"]), _num(r["median_size_success"]), _num(r["mean_queries"]),
                  f"{1000 * r['seconds_per_example']:.1f}" if math.isfinite(r["seconds_per_example"])
                  else "–"] for r in rows]
        s.blocks.append(("text", f"Run {name}:"))
        s.blocks.append(("table", ["attack", "kind", "through", "eps (attack units)", "attacked",
                                   "success (of attacked)", "median size of successes",
                                   "mean queries", "ms / example"], table))
    s.blocks.append(("text", "eps and sizes: [0, 1] pixel scale for additive attacks, pixels for flow "
                             "attacks, in the attack's norm."))
    return s


def curves(runs, names) -> Section | None:
    by_family: dict[str, list] = defaultdict(list)
    for name, run in zip(names, runs, strict=True):
        if run.meta["mode"] != "per-attack":
            continue
        series = defaultdict(list)
        for a, att in enumerate(run.attacks):
            if att["eps"] is not None:
                series[(att["family"], att["attack"], att["through"])].append(
                    (att["eps"], run.robust(a).mean(), att["label"]))
        for (family, attack, through), points in series.items():
            if len(points) >= 2:
                label = f"{name}: {attack}" + ("" if through == "model" else f" ({through})")
                by_family[family].append((label, sorted(points)))
    if not by_family:
        return None
    s = Section("Robust accuracy vs budget")
    for family, lines in sorted(by_family.items()):
        fig = new_figure(figsize=(6.4, 3.8))
        ax = fig.subplots()
        for label, points in lines:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
        first = max(lines, key=lambda item: len(item[1]))[1]
        ax.set_xticks([p[0] for p in first], [p[2] for p in first], fontsize=8)
        ax.set_xlabel(f"budget ({family})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        s.blocks.append(("figure", Figure(f"curve-{family}", figure_png(fig),
                                          f"Robust accuracy vs {family} budget (per-attack mode)")))
    return s


def _flow_colour(flow: np.ndarray) -> np.ndarray:
    """(2, H, W) flow -> RGB: hue = direction, brightness = magnitude / max."""
    from matplotlib.colors import hsv_to_rgb

    u, v = flow[0], flow[1]
    mag = np.hypot(u, v)
    hue = (np.arctan2(v, u) / (2 * np.pi)) % 1.0
    value = mag / mag.max() if mag.max() > 0 else mag
    return hsv_to_rgb(np.stack([hue, np.ones_like(hue), value], -1))


def _rgb(chw: np.ndarray) -> np.ndarray:
    hwc = np.clip(chw.transpose(1, 2, 0), 0, 1)
    return np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else hwc[..., :3]


def _perturbation_tile(p: np.ndarray) -> tuple[np.ndarray, str]:
    if p.shape[0] == 2:  # a flow field in pixels
        return _flow_colour(p), f"flow max {np.abs(p).max():.2g}px"
    amp = float(np.abs(p).max())
    tile = 0.5 + p / (2 * amp) if amp > 0 else np.full_like(p, 0.5)
    return _rgb(tile), f"delta max {amp * 255:.1f}/255"


def sample_grid(path: Path, run: RunResults, name: str, per_attack: int = 2,
                max_attacks: int = 12, scale: int = 3) -> Figure | None:
    """One mosaic image (drawn once, fast for many attacks): per attack, ``per_attack`` examples as
    clean / adversarial / perturbation; flow fields get arrows on top of their colour coding."""
    conn, _ = open_results(path, readonly=True)
    try:
        rows = conn.execute(
            "SELECT aid, idx, success, shape, clean, adversarial, pshape, perturbation "
            "FROM samples ORDER BY aid, success DESC, idx").fetchall()
    finally:
        conn.close()
    picked = defaultdict(list)
    for row in rows:
        if len(picked[row[0]]) < per_attack and (row[0] in picked or len(picked) < max_attacks):
            picked[row[0]].append(row)
    if not picked:
        return None
    classes = run.meta.get("classes")
    first = blob_array(rows[0][3], rows[0][4])
    h, w = first.shape[1] * scale, first.shape[2] * scale
    header, gap, cols = 16, 8, 3 * per_attack
    cell_h, cell_w = h + header, w + gap
    mosaic = np.ones((len(picked) * cell_h, cols * cell_w, 3))
    texts, arrows = [], []
    for r, (aid, samples) in enumerate(sorted(picked.items())):
        top = r * cell_h + header
        texts.append((-6, top + h / 2, run.attacks[aid]["id"], "right", "black"))
        for k, (_, idx, success, shape, clean, adv, pshape, pert) in enumerate(samples):
            p = blob_array(pshape, pert)
            tile_p, title_p = _perturbation_tile(p)
            label = int(run.labels[idx])
            tiles = [(_rgb(blob_array(shape, clean)), f"#{idx} {classes[label] if classes else label}",
                      "black"),
                     (_rgb(blob_array(shape, adv)), "fooled" if success else "not fooled",
                      "#b00000" if success else "#006000"),
                     (tile_p, title_p, "black")]
            for c, (tile, title, colour) in enumerate(tiles):
                left = (3 * k + c) * cell_w
                mosaic[top:top + h, left:left + w] = np.kron(tile, np.ones((scale, scale, 1)))[:h, :w]
                texts.append((left + w / 2, top - 3, title, "center", colour))
            if p.shape[0] == 2 and np.abs(p).max() > 0:
                step = max(1, p.shape[1] // 8)
                ys, xs = np.mgrid[step // 2:p.shape[1]:step, step // 2:p.shape[2]:step]
                length = 0.9 * step * scale / np.abs(p).max()
                left = (3 * k + 2) * cell_w
                arrows.append(np.stack([left + (xs + 0.5) * scale, top + (ys + 0.5) * scale,
                                        p[0][ys, xs] * length, p[1][ys, xs] * length], -1).reshape(-1, 4))
    dpi = 100
    fig = new_figure(figsize=((mosaic.shape[1] + 150) / dpi, (mosaic.shape[0] + 30) / dpi), dpi=dpi)
    ax = fig.add_axes((150 / (mosaic.shape[1] + 150), 0, mosaic.shape[1] / (mosaic.shape[1] + 150),
                       mosaic.shape[0] / (mosaic.shape[0] + 30)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for x, y, text, align, colour in texts:
        ax.text(x, y, text, ha=align, va="bottom" if align == "center" else "center", fontsize=7,
                color=colour, clip_on=False)
    if arrows:
        a = np.concatenate(arrows)  # image y points down, as the flow's y component does
        ax.quiver(a[:, 0], a[:, 1], a[:, 2], a[:, 3], angles="xy", scale_units="xy", scale=1,
                  color="white", width=0.0025)
    fig.suptitle(f"{name}: clean / adversarial / perturbation (scaled to its max)", fontsize=8)
    return Figure(f"samples-{name}", figure_png(fig), f"{name}: example images per attack; flow fields "
                  "coloured by direction (hue) and size (brightness), with arrows")


def artifacts(path: Path) -> dict[str, bytes]:
    conn, _ = open_results(path, readonly=True)
    try:
        return dict(conn.execute("SELECT name, data FROM artifacts").fetchall())
    finally:
        conn.close()


def figures_and_verdicts(runs, names) -> list[Section]:
    images, verdicts = Section("Example images"), Section("Gradient sign and gradient-masking diagnostics")
    for name, run in zip(names, runs, strict=True):
        grid = sample_grid(run.path, run, name)
        if grid is not None:
            images.blocks.append(("figure", grid))
        stored = artifacts(run.path)
        if "gradient_sign" in stored:
            verdicts.blocks.append(("figure", Figure(
                f"gradient-sign-{name}", stored["gradient_sign"],
                f"{name}: sign of the input gradient of the loss (GCM paper, Fig. 4); noise means "
                "the autograd gradient carries no usable direction")))
        if "diagnostics" in stored:
            d = json.loads(stored["diagnostics"])
            verdicts.blocks.append(("text", f"Run {name} — diagnostics (records: {d.get('records')}):"))
            verdicts.blocks.append(("code", d["text"]))
        else:
            verdicts.blocks.append(("text", f"Run {name}: no diagnostics stored (run evaluate with "
                                            "--diagnose)."))
    return [s for s in (images, verdicts) if s.blocks]


def reproduction(runs, names) -> Section:
    s = Section("Reproduction")
    for name, run in zip(names, runs, strict=True):
        m = run.meta
        commands = m.get("commands") or [m.get("command", "")]
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(m.get("created", 0)))
        s.blocks.append(("text", f"Run {name} ({run.path.name}), started {started}, seed {m.get('seed')}, "
                                 f"batch size {m.get('batch_size')}, mode {m.get('mode')}:"))
        s.blocks.append(("code", "\n".join(c for c in commands if c) or "(run from Python)"))
        s.blocks.append(("code", json.dumps(m.get("versions", {}), indent=1)))
        s.blocks.append(("details", f"suite {m.get('suite')} ({m.get('suite_origin')})",
                         m.get("suite_toml", "")))
    return s


def build_sections(paths) -> tuple[list[RunResults], list[Section]]:
    if not paths:
        raise GradshieldError("give at least one results file (RUN.db)")
    runs = [load_run(p) for p in paths]
    names = run_names(runs)
    rows_by_run = [attack_rows(r) for r in runs]
    sections = [overview(runs, names), headline(runs, names),
                per_attack_table(runs, names, rows_by_run), paired(runs, names),
                group_worst_case(runs, names),
                curves(runs, names), *figures_and_verdicts(runs, names),
                attack_details(runs, names, rows_by_run), reproduction(runs, names)]
    return runs, [s for s in sections if s is not None]


# --------------------------------------------------------------------------- writers


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(sections: list[Section], out: Path, title: str, *, heading_level: int = 2,
                intro: str = "") -> str:
    """Markdown of the sections; figures are written as PNG files into ``out``."""
    lines = [f"# {title}", ""] + ([intro, ""] if intro else [])
    for s in sections:
        if s.title:
            lines += [f"{'#' * heading_level} {s.title}", ""]
        for block in s.blocks:
            if block[0] == "table":
                _, head, rows = block
                lines.append("| " + " | ".join(_md_cell(h) for h in head) + " |")
                lines.append("|" + "---|" * len(head))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            elif block[0] == "figure":
                fig = block[1]
                file = f"{_safe(fig.name)}.png"
                (out / file).write_bytes(fig.png)
                lines.append(f"![{fig.caption}]({file})")
                lines.append(f"*{fig.caption}*")
            elif block[0] == "text":
                lines.append(block[1])
            elif block[0] == "code":
                lines += ["```", block[1], "```"]
            elif block[0] == "details":
                lines += [f"<details><summary>{html.escape(block[1])}</summary>", "", "```toml",
                          block[2], "```", "</details>"]
            lines.append("")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;padding:0 16px;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:1.8em}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f2f5}tr:nth-child(even) td{background:#fafafa}
pre{background:#f5f5f5;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap}
figure{margin:10px 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}
.note{font-size:13px;color:#333}
"""


def to_html(sections: list[Section], title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        if s.title:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
        for block in s.blocks:
            if block[0] == "table":
                _, head, rows = block
                parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
                             + "</tr></thead><tbody>")
                parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                          for row in rows]
                parts.append("</tbody></table>")
            elif block[0] == "figure":
                fig = block[1]
                data = base64.b64encode(fig.png).decode()
                parts.append(f'<figure><img alt="{html.escape(fig.caption)}" '
                             f'src="data:image/png;base64,{data}"><figcaption>'
                             f"{html.escape(fig.caption)}</figcaption></figure>")
            elif block[0] == "text":
                parts.append(f'<p class="note">{html.escape(block[1])}</p>')
            elif block[0] == "code":
                parts.append(f"<pre>{html.escape(block[1])}</pre>")
            elif block[0] == "details":
                parts.append(f"<details><summary>{html.escape(block[1])}</summary><pre>"
                             f"{html.escape(block[2])}</pre></details>")
    parts.append(f'<p class="note">Generated by gradshield at '
                 f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.</p></body></html>')
    return "\n".join(parts)


def write_report(paths, out: str | os.PathLike, *, title: str | None = None) -> dict:
    """Write ``out/report.md`` (+ PNGs) and ``out/report.html`` for one or more results files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs, sections = build_sections([Path(p) for p in paths])
    title = title or "gradshield robustness report: " + " vs ".join(run_names(runs))
    (out / "report.md").write_text(to_markdown(sections, out, title))
    (out / "report.html").write_text(to_html(sections, title))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
            "runs": len(runs), "seconds": round(time.perf_counter() - started, 3),
            "incomplete": [str(r.path) for r in runs if not r.complete]}
