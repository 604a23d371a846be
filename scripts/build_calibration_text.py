"""Build the calibration text of the criteria (common/evaluation/task_data/calibration.jsonl).

Calibrated criteria (thresholds, modes, rotations) read activations on text that is never an
evaluation item. The passages are prose paragraphs of Python's documentation topics
(``pydoc_data.topics``, shipped with CPython under the PSF License, the text the embedded LLaDA
model is trained on): no dataset hub, and nothing shared with the BIG-bench suites or the fables
(``common.evaluation.calibration.check_disjoint`` asserts that whenever the text is read). The
BIG-bench release the suites come from is not on the package index this toolkit is built with, so
its unused tasks could not be drawn on.

A paragraph is kept when it is prose: at least ``MIN_WORDS`` words, mostly letters, no code or
grammar lines. The passages are written in an order seeded by their text, so the first n of them
(a calibration that stops at a token budget) are a uniform sample of the topics.

    python scripts/build_calibration_text.py            # writes the file
    python scripts/build_calibration_text.py --check    # exit 1 if the file is not the one this Python gives
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "common" / "evaluation" / "task_data" / "calibration.jsonl"
PASSAGES = 300
MIN_WORDS = 30
MAX_WORDS = 200
CODE = re.compile(r"^\s*(>>>|\.\.\.|\$ |::=|[a-z_]+ +::=)|::=|^\s*[*=\-]{3,}\s*$")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, with code, grammar and heading lines left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if any(CODE.search(line) for line in lines) or any(line.startswith("      ") for line in lines):
            continue
        out.append(" ".join(line.strip() for line in lines).strip())
    return out


def is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return MIN_WORDS <= len(words) <= MAX_WORDS and letters >= 0.85 * len(paragraph) and paragraph[-1] in ".:)"


def passages(count: int = PASSAGES) -> list[dict]:
    from pydoc_data.topics import topics

    found = [{"text": p, "source": f"pydoc_data.topics:{name}#{index}"}
             for name in sorted(topics) for index, p in enumerate(paragraphs(topics[name])) if is_prose(p)]
    if len(found) < count:
        raise SystemExit(f"only {len(found)} prose paragraphs in this Python's documentation topics; need {count}")
    step = len(found) / count  # evenly over the topics, then in a seeded order
    chosen = [found[int(i * step)] for i in range(count)]
    random.Random("calibration").shuffle(chosen)
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs")
    args = parser.parse_args()
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages())
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out} {'is' if same else 'is not'} the text this Python ({sys.version.split()[0]}) gives")
        return 0 if same else 1
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    words = sum(len(json.loads(line)["text"].split()) for line in text.splitlines())
    print(f"{args.out}: {PASSAGES} passages, {words} words (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
