"""Diagnostic: how right were the JSON answers that never closed? Reads evaluate.py's report.json files.

A model can name the right entities and then fail to close the JSON object: on a type list it never trained on, it
writes the last asked type and then keeps writing keys (`"politicalparty": [], "politicalparty": [], …`) until
max_new_tokens cuts it. evaluate.py scores such an answer as unparsed (every entity missed), as ReasoningNER's
evaluation does. This script re-scores each report with, for answers that did not parse, the first list written
under each asked type, so "cannot close the object" and "does not know the entities" can be told apart. It is a
diagnostic, not a protocol: the README's scores are evaluate.py's.

    python scripts/salvage_runaway_json.py outputs/lodo/*_politics/report.json [--write outputs/lodo_salvaged]

``--write DIR`` also writes each report with the salvaged answers as DIR/<report's folder>/report.json, which
``evaluate.py --compare`` reads like any other (a paired bootstrap of the salvaged scores).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ner.protocols import score_protocols  # noqa: E402

KEY_LIST = re.compile(r'"([^"]+)":\s*\[([^\]]*)\]')
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def first_lists(answer: str, types: list[str]) -> dict[str, list[str]]:
    """{type: the first list written under it after </think>} for every asked type ([] when never written)."""
    found: dict[str, list[str]] = {}
    for key, items in KEY_LIST.findall(answer.split("</think>")[-1]):
        if key in types and key not in found:
            found[key] = [json.loads(f'"{s}"') for s in STRING.findall(items)]
    return {t: found.get(t, []) for t in types}


def main(paths: list[str], write: str = "") -> None:
    print("| report | data set | answers | unparsed | writing more keys than asked | strict F1 | F1 with salvaged answers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in paths:
        report = json.loads(Path(path).read_text())
        for name, res in report["results"].items():
            if name == "average":
                continue
            sentences = res["sentences"]
            golds, preds, looping = [], [], 0
            for s in sentences:
                answer = s["completions"][0] if isinstance(s["completions"], list) else s["completions"]
                pred = s["pred"]
                if not s["format_ok"]:
                    pred = first_lists(answer, s["types"])
                    looping += len(KEY_LIST.findall(answer.split("</think>")[-1])) > len(s["types"])
                golds.append(s["gold"])
                preds.append(pred)
                s["pred"] = pred
            types = sentences[0]["types"]
            salvaged = score_protocols(golds, preds, types, "strict")["strict"]["f1"]
            strict = res["protocols"]["strict"]["f1"]
            unparsed = sum(not s["format_ok"] for s in sentences)
            print(f"| {path} | {name} | {len(sentences)} | {unparsed} | {looping} | {strict:.4f} | {salvaged:.4f} |")
        if write:
            out = Path(write) / Path(path).parent.name / "report.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report))


if __name__ == "__main__":
    args = sys.argv[1:]
    target = ""
    if "--write" in args:
        i = args.index("--write")
        target, args = args[i + 1], args[:i] + args[i + 2:]
    main(args, target)
