"""Stage 4's report: report.md (the per-category table with 95 % intervals, the instruction kinds, examples,
the retention probes, and a benchmark's own figures) and scores.png (bars with interval whiskers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from desta.core.hub import public_name
from desta.core.stats import bootstrap_table
from desta.evaluation.chance import CHANCE, CONSTANT, baselines, margin_series, stronger_baseline
from desta.evaluation.groups import item_groups
from desta.evaluation.items import parsed
from desta.evaluation.scoring import agreement
from desta.evaluation.systems import TEACHER, TEACHER_ASR, TEXT, TEXT_ASR, TEXT_OWN, TEXT_OWN_ASR, SystemsRun


def _ratios(run: SystemsRun, items: list[dict], series: dict[str, list[float | None]]) -> dict[str, tuple[str, str]]:
    """The ratios a report shows, each as (numerator, denominator) systems: forgetting, ASR cost, what the
    connector costs against its own LLM, and against the teacher; adds each system's agreement and ROUGE-L with
    the text reference to `series`."""
    answers, asr_of = run.answers, run.asr_of
    ratios: dict[str, tuple[str, str]] = {}
    if TEXT in answers:
        for name in run.speech:
            pairs = [agreement(i, a, r) for i, a, r in zip(items, answers[name], answers[TEXT], strict=True)]
            series[f"agreement:{name}"] = [p[0] for p in pairs]
            series[f"rouge_l:{name}"] = [p[1] for p in pairs]
            ratios[f"forgetting:{name}"] = (name, TEXT)
            if name in asr_of:
                ratios[f"forgetting_asr:{name}"] = (name, asr_of[name])
        for reference in sorted(set(asr_of.values())):
            ratios[f"asr_cost:{reference}"] = (reference, TEXT)
    for name in run.speech:  # what the connector costs against its own LLM as trained; what the teacher could carry
        own = next((r for r in (f"{TEXT_OWN_ASR}:{name}", f"{TEXT_OWN}:{name}") if r in answers), None)
        if own:
            ratios[f"connector:{name}"] = (name, own)
        teacher = next((r for r in (TEACHER_ASR, TEACHER) if r in answers), None)
        if teacher:
            ratios[f"vs_teacher:{name}"] = (name, teacher)
    return ratios


def _group_rows(run: SystemsRun, items: list[dict], series: dict[str, list[float | None]],
                ratios: dict[str, tuple[str, str]], resamples: int, seed: int) -> dict[str, dict[str, dict]]:
    """Each system's overall row for the items of each group (trained vs unseen tasks, seen vs unseen voices)."""
    categories = [i["category"] for i in items]
    groups: dict[str, dict[str, dict]] = {}
    for name in run.speech:
        data = run.training.get(name)
        for group, members in (item_groups(items, data) if data else {}).items():
            shown = [s for s in series if s in run.answers or s in (CHANCE, CONSTANT) or s == f"above_chance:{name}"]
            row = bootstrap_table([categories[k] for k in members], {s: [series[s][k] for k in members] for s in shown},
                                  {r: ratios[r] for r in ratios if r.endswith(f":{name}")}, resamples=resamples,
                                  seed=seed)["overall"]
            groups.setdefault(name, {})[group] = row
    return groups


def build_report(run: SystemsRun, items: list[dict], scores: dict[str, list[dict]], judge_id: str | None,
                 eval_set: str, checkpoints: list[str], resamples: int, seed: int) -> dict[str, Any]:
    """report.json: per category and overall, every system's mean score, the forgetting and ASR-cost ratios,
    agreement and ROUGE-L with text-gold, each with its paired bootstrap interval; the instruction kinds; the
    probes; every item's answers, scores and reasons."""
    answers, speech, asr_of = run.answers, run.speech, run.asr_of
    series: dict[str, list[float | None]] = {s: [r["score"] for r in results] for s, results in scores.items()}
    ratios = _ratios(run, items, series)
    base = baselines(items)
    if any(v is not None for v in base[CHANCE]):
        series.update(base)
        stronger = stronger_baseline(items, base)
        for name in answers:
            series[f"above_chance:{name}"] = margin_series(series[name], stronger)
    categories = [i["category"] for i in items]
    table = bootstrap_table(categories, series, ratios, resamples=resamples, seed=seed)
    overall = table.pop("overall")
    following = [k for k, i in enumerate(items) if (parsed(i, "check") or {}).get("style") == "ifeval"]
    kinds = bootstrap_table([parsed(items[k], "check")["instruction"]["id"] for k in following],
                            {s: [series[s][k] for k in following] for s in answers},
                            resamples=resamples, seed=seed) if following else {}
    kinds.pop("overall", None)
    groups = _group_rows(run, items, series, ratios, resamples, seed)
    return {
        "eval_set": str(eval_set), "items": len(items), "checkpoints": checkpoints, "systems": speech,
        "references": {TEXT: "the same LLM reading the description with the gold transcript",
                       **{r: "the same LLM reading the description with the speech model's Whisper transcript"
                          for r in sorted(set(asr_of.values()))}, **run.references},
        "groups": groups,
        "training": {name: {"tasks": sorted(d.tasks) if d.tasks is not None else None,
                            "voices": len(d.voices) if d.voices is not None else None, "source": d.source}
                     for name, d in run.training.items()},
        "asr_reference_of": asr_of, "whisper_wer": run.whisper_wer, "text_reference_llm": run.text_llm,
        "judge": judge_id,
        "interval": f"bootstrap 95 % ({resamples} resamples, seed {seed}, items resampled within "
                    "each category, paired across systems)",
        "items_per_second": {s: round(len(items) / t, 3) for s, t in run.timing.items()},
        "categories": table, "overall": overall, "instruction_following_kinds": kinds,
        "echoes": echo_counts(items, scores),
        "equivalence_margin": EQUIVALENCE_MARGIN,
        "retention_probes": {k: {m: v for m, v in p.items() if m != "items"} for k, p in run.probes.items()},
        "per_item": [{"item_id": i["item_id"], "category": i["category"], "instruction": i["instruction"],
                      "gold": i.get("answer"), **{f"{s}_answer": answers[s][k] for s in answers},
                      **{f"{s}_score": scores[s][k]["score"] for s in answers},
                      **{f"{s}_reason": scores[s][k]["reason"] for s in answers}} for k, i in enumerate(items)],
    }


EQUIVALENCE_MARGIN = 0.10  # "within 10 %" of a reference only when the ratio's whole interval is inside +-10 %


def echo_counts(items: list[dict], scores: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Per system, how many answers in each category were scored 0 as an echo of the description."""
    counts: dict[str, dict[str, int]] = {}
    for system, results in scores.items():
        for item, result in zip(items, results, strict=True):
            if str(result.get("reason", "")).startswith("echo"):
                per = counts.setdefault(system, {})
                per[item["category"]] = per.get(item["category"], 0) + 1
    return counts


def equivalence(value: float | None, ci: list[float] | None, margin: float = EQUIVALENCE_MARGIN) -> str:
    """What a relative difference shows: "within X %" only when its whole interval is inside +-X %; a difference
    when the interval excludes 0; else "not shown" (neither equal within X % nor different).

    >>> equivalence(0.01, [-0.05, 0.08]), equivalence(0.01, [-0.2, 0.29]), equivalence(-0.4, [-0.5, -0.3])
    ('within 10 %', 'not shown: [-20 %, +29 %] is wider than +-10 %', 'below: -40 % [-50 %, -30 %]')
    """
    if value is None or not ci:
        return "not measured"
    low, high = ci
    width = f"{margin * 100:.0f} %"
    shown = f"{value * 100:+.0f} % [{low * 100:+.0f} %, {high * 100:+.0f} %]"
    if -margin <= low and high <= margin:
        return f"within {width}"
    if high < 0:
        return f"below: {shown}"
    if low > 0:
        return f"above: {shown}"
    return f"not shown: [{low * 100:+.0f} %, {high * 100:+.0f} %] is wider than +-{width}"


def _fmt(value: float | None, ci: list[float] | None = None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.0%}" if percent else f"{value:.2f}"
    if ci:
        low, high = ci
        text += f" [{low:+.0%}, {high:+.0%}]" if percent else f" [{low:.2f}, {high:.2f}]"
        if percent and low <= 0 <= high:
            text += " ~"
    return text


def format_cell(row: dict, name: str, percent: bool = False) -> str:
    """A table cell: the row's value for `name` with its interval ("0.62 [0.51, 0.73]"); ~ marks a
    difference whose interval includes 0."""
    return _fmt(row["values"].get(name), row["ci"].get(name), percent)


def render_markdown(report: dict) -> str:
    """report.md: the per-category table with intervals, the instruction kinds, examples, the probes."""
    speech = report["systems"]
    asr_of = report.get("asr_reference_of", {})
    references = [r for r in (TEXT_ASR, TEXT) if r in report["overall"]["values"]] + sorted(
        {r for r in asr_of.values() if r != TEXT_ASR})
    references += [r for r in report.get("references", {}) if r not in references and r in report["overall"]["values"]]
    values = report["overall"]["values"]
    head = ["category", "n", *[s if s == "speech" else f"speech {s}" for s in speech], *[label(r) for r in references]]
    for s in speech:
        head += [f"forgetting vs text-ASR ({s})"] * (s in asr_of) + [f"forgetting vs text-gold ({s})",
                                                                    f"agreement ({s})", f"ROUGE-L ({s})"]
        head += [f"connector cost vs its own LLM ({s})"] * (f"connector:{s}" in values)
        head += [f"vs the teacher ({s})"] * (f"vs_teacher:{s}" in values)
    head += [f"ASR cost ({r})" for r in sorted(set(asr_of.values()))]
    lines = [f"# desta eval: {report['items']} items", "",
             f"Speech model(s) against the same LLM ({public_name(report['text_reference_llm'])}) reading the clip's "
             "description: with the gold transcript (text-gold) and with the transcript the speech model receives "
             "from its Whisper (text-ASR). Forgetting = (speech - reference) / reference: against text-ASR it is "
             "what the connector loses, the ASR cost (text-ASR - text-gold) / text-gold is what Whisper's mistakes "
             "lose. "
             "Agreement: the same closed answer as text-gold; ROUGE-L: word overlap with text-gold's answer. "
             f"Cells: value [{report['interval']}]; ~ marks a difference whose interval includes 0 (not "
             "distinguishable from noise)." + (f" Judge: {report['judge']}." if report["judge"] else
                                               " No judge: open questions unscored."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if report.get("intro"):  # a benchmark's report: its own title, and what its reference reads
        lines[0], lines[2] = report["title"], report["intro"]
    rows = list(report["categories"].items()) + [("**overall**", report["overall"])]
    for category, row in rows:
        cells = [category, str(row["n"]), *[format_cell(row, s) for s in speech + references]]
        for s in speech:
            if s in asr_of:
                cells.append(format_cell(row, f"forgetting_asr:{s}", True))
            cells += [format_cell(row, f"forgetting:{s}", True), format_cell(row, f"agreement:{s}"),
                      format_cell(row, f"rouge_l:{s}")]
            cells += [format_cell(row, f"{k}:{s}", True) for k in ("connector", "vs_teacher") if f"{k}:{s}" in values]
        cells += [format_cell(row, f"asr_cost:{r}", True) for r in sorted(set(asr_of.values()))]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("whisper_wer"):
        lines += ["", "Whisper word error rate on these clips (what the speech model hears as its transcript): "
                  + ", ".join(f"{s} {w:.2f}" for s, w in report["whisper_wer"].items()) + "."]
    lines += _chance_section(report, speech + references)
    lines += _groups_section(report, references)
    lines += ["", "Items per second: " + ", ".join(f"{s} {v}" for s, v in report["items_per_second"].items())]
    lines += _kinds_section(report, speech + references)
    lines += _examples(report, speech + references)
    lines += _probes_section(report)
    if report.get("benchmark"):
        lines += render_official(report)
    return "\n".join(lines) + "\n"


def _kinds_section(report: dict, systems: list[str]) -> list[str]:
    """report.md's table of instruction following by IFEval instruction, when the items have any."""
    if not report.get("instruction_following_kinds"):
        return []
    lines = ["", "## Instruction following by IFEval instruction (strict)", "",
             "| instruction | n | " + " | ".join(systems) + " |", "|" + "---|" * (len(systems) + 2)]
    for kind, row in report["instruction_following_kinds"].items():
        lines.append(f"| {kind} | {row['n']} | " + " | ".join(format_cell(row, s) for s in systems) + " |")
    return lines


def _probes_section(report: dict) -> list[str]:
    """report.md's text retention probes, when they ran."""
    if not report["retention_probes"]:
        return []
    lines = ["", "## Text retention probes (the LLM without audio)", "",
             "| model | format following | JSON validity | refusal (harmful) | over-refusal | held-out log-lik |",
             "|---|---|---|---|---|---|"]
    for name, p in report["retention_probes"].items():
        lines.append(f"| {name} | {p['format_following']:.2f} | {p['json_validity']:.2f} | "
                     f"{p['refusal_rate']:.2f} | {p['over_refusal_rate']:.2f} | {p['heldout_loglik']:.3f} |")
    return lines


def _chance_section(report: dict, systems: list[str]) -> list[str]:
    """Each system's score minus the stronger of chance and the best constant answer, per category (paired
    intervals; * marks an interval above 0), the echo counts, and what the forgetting ratios show."""
    overall = report["overall"]["values"]
    if CHANCE not in overall:
        return []
    rows = [(c, r) for c, r in report["categories"].items() if r["values"].get(CHANCE) is not None]
    lines = ["", "## Against chance", "",
             "What guessing scores on the closed items, without hearing anything: chance (a uniformly random label, "
             "yes/no or another clip's duration) and the best constant answer per category and form. Each system's "
             "score minus the stronger of the two, item by item (paired 95 % interval); * marks a category where the "
             "whole interval is above 0 (the system does better than guessing there).", "",
             "| category | n | chance | best constant | " + " | ".join(f"{label(s)} above chance" for s in systems)
             + " |", "|" + "---|" * (4 + len(systems))]
    for category, row in rows + [("**closed items**", report["overall"])]:
        cells = [category, str(row["n"]) if category != "**closed items**" else "",
                 format_cell(row, CHANCE), format_cell(row, CONSTANT)]
        for system in systems:
            name = f"above_chance:{system}"
            ci = row["ci"].get(name)
            mark = " *" if ci and ci[0] > 0 else ""
            cells.append(format_cell(row, name) + mark)
        lines.append("| " + " | ".join(cells) + " |")
    echoes = report.get("echoes") or {}
    if echoes:
        lines += ["", "Echoes (scored 0: the answer reproduces the description's format or names two or more fields "
                      "it was not asked about): " + "; ".join(
                          f"{label(s)} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})"
                          for s, c in echoes.items()) + "."]
    reads = []
    for system in report["systems"]:
        for key, reference in ((f"forgetting_asr:{system}", "text-ASR"), (f"forgetting:{system}", "text-gold")):
            if key in overall:
                margin = report.get("equivalence_margin", EQUIVALENCE_MARGIN)
                shown = equivalence(overall[key], report["overall"]["ci"].get(key), margin)
                reads.append(f"{label(system)} vs {reference}: {shown}")
    if reads:
        lines += ["", "Overall, relative to each reference: " + "; ".join(reads) + "."]
    return lines


def _groups_section(report: dict, references: list[str]) -> list[str]:
    """Each speech system on trained vs unseen tasks and seen vs unseen voices (closed and open items alike)."""
    lines: list[str] = []
    for system, groups in (report.get("groups") or {}).items():
        shown = [system, *[r for r in references if r in next(iter(groups.values()))["values"]]]
        lines += ["", f"## What is unseen for {label(system)}", "",
                  f"Trained tasks: the categories its training prompts asked about "
                  f"({', '.join(report['training'][system]['tasks'] or []) or 'none'}); seen voices: eval clips whose "
                  f"voice is among the {report['training'][system]['voices']} voices of its training data "
                  f"({report['training'][system]['source']}). Mean over the group's categories, paired intervals.", "",
                  "| items | n | " + " | ".join(label(s) for s in shown) + f" | {label(system)} above chance |",
                  "|" + "---|" * (len(shown) + 3)]
        for group, row in groups.items():
            cells = [group, str(row["n"]), *[format_cell(row, s) for s in shown],
                     format_cell(row, f"above_chance:{system}")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_official(report: dict) -> list[str]:
    """The benchmark's figures as its authors report them, one column per system."""
    from desta.evaluation.benchmarks import benchmark

    bench = report["benchmark"]
    labels = {s: label(s) if s == TEXT else s for s in bench["official"]}
    return ["", f"## {bench['name']} as its authors report it", "",
            *benchmark(bench["name"]).render(bench["official"], labels)]


def label(system: str) -> str:
    """A system's name in reports: the references by what they read.

    >>> label("text"), label("text_asr:lora"), label("speech"), label("text_own_asr:lora"), label("teacher")
    ('text-gold', 'text-ASR:lora', 'speech', 'own LLM text-ASR (lora)', 'teacher text-gold')
    """
    for prefix, shown in ((f"{TEXT_OWN_ASR}:", "own LLM text-ASR"), (f"{TEXT_OWN}:", "own LLM text-gold")):
        if system.startswith(prefix):
            return f"{shown} ({system.removeprefix(prefix)})"
    names = {TEXT: "text-gold", TEXT_ASR: "text-ASR", TEACHER: "teacher text-gold", TEACHER_ASR: "teacher text-ASR"}
    return names.get(system, system.replace(TEXT_ASR, "text-ASR"))


def _examples(report: dict, systems: list[str], per_category: int = 2, width: int = 160) -> list[str]:
    """Two items per category with every system's answer, to read what the scores mean."""
    lines = ["", "## Examples", ""]
    shown: dict[str, int] = {}
    for item in report["per_item"]:
        if shown.get(item["category"], 0) >= per_category:
            continue
        shown[item["category"]] = shown.get(item["category"], 0) + 1
        instruction = item["instruction"].replace("\n", " ")
        gold = "" if item["gold"] is None else f" (gold: {str(item['gold'])[:80]})"
        lines.append(f"- **{item['category']}**: {instruction[:width]}{gold}")
        for system in systems:
            answer = " ".join(str(item[f"{system}_answer"]).split())
            score = item[f"{system}_score"]
            lines.append(f"  - {label(system)} ({'unscored' if score is None else f'{score:.2f}'}): "
                         f"{answer[:width]}{'...' if len(answer) > width else ''}")
    return lines


def plot_scores(report: dict, path: Path) -> None:
    """Grouped bars per category with 95 % interval whiskers: each speech system and the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**report["categories"], "overall": report["overall"]}
    systems = report["systems"] + [r for r in (TEXT_ASR, TEXT) if r in report["overall"]["values"]]
    categories = list(rows)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(categories) + 2), 4.6))
    for k, system in enumerate(systems):
        values = np.array([rows[c]["values"].get(system) or 0.0 for c in categories])
        cis = [rows[c]["ci"].get(system) or [v, v] for c, v in zip(categories, values, strict=True)]
        errors = np.array([[v - lo, hi - v] for v, (lo, hi) in zip(values, cis, strict=True)]).T.clip(min=0)
        label = {TEXT: "text-gold (LLM reads gold description)",
                 TEXT_ASR: "text-ASR (LLM reads description with Whisper transcript)"}.get(system, f"speech: {system}")
        ax.bar(np.arange(len(categories)) + k * width, values, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(np.arange(len(categories)) + width * (len(systems) - 1) / 2, categories, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (1 = right), 95 % interval")
    ax.set_title("desta eval: speech model vs text references")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
