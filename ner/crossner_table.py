"""ReasoningNER's Table 1 (zero-shot CrossNER) next to our scores: the ``crossner`` group name, the published rows
and the table evaluate.py writes when a report covers two or more data sets.

The paper (Huang et al., "A Reasoning Paradigm for Named Entity Recognition", arXiv 2511.11978, AAAI 2026) reports
zero-shot F1 in percent, scored by UniversalNER's rule: ``misc`` left out, texts normalised, a set of (text, type)
pairs per sentence, micro over a data set (our ``reasoningner`` protocol, ner/protocols.py). Its "Avg" is the
unweighted mean of per-data-set F1s, as our evaluate.py's average is, but over SEVEN sets: MIT Movie, MIT Restaurant
and the five CrossNER domains (the caption says "the average performance across the seven datasets"; the authors'
evaluate.py averages every set of config/dataset/cross_ner.json, which lists those seven). So 72.4 is not the mean of
the five CrossNER columns (that is 74.7 for ReasoningNER 8B). The table therefore shows two averages: the mean of
the columns shown, which is comparable between our rows and the published ones, and the paper's seven-set Avg.
"""
from __future__ import annotations

from dataclasses import dataclass

from ner.protocols import score_protocols

# The five CrossNER domains in the paper's column order, with its column labels.
CROSSNER_DOMAINS: dict[str, str] = {"crossner_ai": "AI", "crossner_literature": "Literature",
                                    "crossner_music": "Music", "crossner_politics": "Politics",
                                    "crossner_science": "Science"}
# One name for several registered data sets, expanded in this order (evaluate.py --dataset crossner).
DATASET_GROUPS: dict[str, list[str]] = {"crossner": list(CROSSNER_DOMAINS)}

CITATION = "ReasoningNER (arXiv 2511.11978), Table 1, zero-shot"


@dataclass(frozen=True)
class PublishedRow:
    """One model's row of the paper's Table 1: F1 in percent per data set (CrossNER domains under our registered
    names, plus the two MIT sets that only enter the paper's average) and the paper's seven-set Avg."""
    model: str
    f1: dict[str, float]
    paper_average: float


# Read from Table 1 ("Out-of-domain evaluation results") as the authors publish it in their repository,
# github.com/HuiResearch/ReasoningIE, assets/table1.png (commit ba41987), the image its README shows under
# "Performance"; the arXiv HTML's table text was not readable from this machine. Each row's seven cells average to
# its Avg within 0.1 (rounding of the cells and of the Avg: tests/test_crossner_table.py checks it). The paper's
# other rows (ChatGPT-3.5, UniNER 13B, InstructUIE, GoLLIE, KnowCoder, GLiNER-L, B2NER, DeepSeek-R1, Qwen3, and
# ReasoningNER 8B on B2NER's re-processed test sets) are left out: the issue asks for these four.
PUBLISHED: list[PublishedRow] = [
    PublishedRow("ReasoningNER 8B", {"mit_movie": 76.3, "mit_restaurant": 56.8, "crossner_ai": 71.0,
                                     "crossner_literature": 69.4, "crossner_music": 78.7,
                                     "crossner_politics": 78.8, "crossner_science": 75.8}, 72.4),
    PublishedRow("ReasoningNER 1.7B", {"mit_movie": 70.2, "mit_restaurant": 52.4, "crossner_ai": 63.6,
                                       "crossner_literature": 59.1, "crossner_music": 71.6,
                                       "crossner_politics": 68.6, "crossner_science": 69.9}, 65.1),
    PublishedRow("GPT-4", {"mit_movie": 60.4, "mit_restaurant": 59.7, "crossner_ai": 50.0,
                           "crossner_literature": 55.2, "crossner_music": 69.2, "crossner_politics": 63.4,
                           "crossner_science": 63.2}, 60.1),
    PublishedRow("UniNER 7B", {"mit_movie": 42.4, "mit_restaurant": 31.7, "crossner_ai": 53.5,
                               "crossner_literature": 59.4, "crossner_music": 65.0, "crossner_politics": 60.8,
                               "crossner_science": 61.1}, 53.4),
]

# Our rows: the paper's protocol first, then ours.
TABLE_PROTOCOLS = {"reasoningner": "the paper's protocol", "strict": "our strict protocol"}


def expand_dataset_groups(names: list[str]) -> list[str]:
    """``names`` with each group name replaced by its members, in order; a name that comes twice is kept at its
    first place (``crossner,crossner_ai`` scores AI once)."""
    expanded = [member for name in names for member in DATASET_GROUPS.get(name, [name])]
    return list(dict.fromkeys(expanded))


def _mean(values: list[float | None]) -> float | None:
    """Unweighted mean, or None when a value is missing (an average over fewer columns would mislead)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def table1(results: dict[str, dict]) -> dict:
    """Table 1 of ``results`` (evaluate.py's {data set: result}, each with its per-sentence ``sentences`` and
    ``report``; other keys such as ``average`` are skipped): F1 in percent, a column per data set, our rows under
    the reasoningner and strict protocols, then the published rows when a column is a CrossNER domain.

    ``average`` is the unweighted mean of a row's cells (None when one is missing); ``paper_average`` is the
    paper's seven-set Avg (None for our rows)."""
    columns = [name for name, res in results.items() if "sentences" in res]
    rows = []
    for protocol, what in TABLE_PROTOCOLS.items():
        cells = {}
        for name in columns:
            sentences, types = results[name]["sentences"], list(results[name]["report"]["per_type"])
            scores = score_protocols([s["gold"] for s in sentences], [s["pred"] for s in sentences], types, protocol)
            cells[name] = 100 * scores[protocol]["f1"]
        rows.append({"label": f"ours, {protocol} ({what})", "source": "ours", "protocol": protocol, "f1": cells,
                     "average": _mean(list(cells.values())), "paper_average": None})
    if any(name in CROSSNER_DOMAINS for name in columns):
        for row in PUBLISHED:
            cells = {name: row.f1.get(name) for name in columns}
            rows.append({"label": f"{row.model}, published (paper Table 1)", "source": CITATION,
                         "protocol": "reasoningner", "f1": cells, "average": _mean(list(cells.values())),
                         "paper_average": row.paper_average})
    return {"columns": columns, "rows": rows, "citation": CITATION}


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def format_table1(table: dict) -> str:
    """Markdown of ``table1``'s output, F1 in percent with one decimal, and what the two averages are."""
    labels = [CROSSNER_DOMAINS.get(name, name) for name in table["columns"]]
    lines = ["| | " + " | ".join(labels) + " | Avg | paper's Avg (7 sets) |",
             "|---|" + "---:|" * (len(labels) + 2)]
    for row in table["rows"]:
        cells = [row["f1"][name] for name in table["columns"]] + [row["average"], row["paper_average"]]
        lines.append(f"| {row['label']} | " + " | ".join(_cell(v) for v in cells) + " |")
    note = ("Avg: the unweighted mean of the columns shown (— when a published row has no cell there). The paper's "
            "Avg is over seven sets (MIT Movie and MIT Restaurant too): compare our rows with the Avg column. "
            f"Published rows: {table['citation']}.")
    return "\n".join(lines) + "\n\n" + note
