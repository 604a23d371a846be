"""``--rehearse`` in the experiment scripts: quicker defaults and the rehearsal label on every summary.

The replica itself comes from ``common.models.replica``; this module only touches flags and the
files a study wrote, so its outputs cannot be mistaken for results of the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.evaluation.store import atomic_write_json


# A sweep that exercises every step (dense cells, search, PPL criterion, expert tables) in about a minute.
QUICK_SWEEP = {"limit": 4, "tasks": ["bb_social_iqa", "bb_general_knowledge", "fables_ppl"], "resolution": 0.2,
               "bootstrap": 50}


def rehearsal_defaults(parser, args, **values) -> None:
    """Replace flags the user left at their defaults with quicker rehearsal ones (e.g. limit=8)."""
    for dest, value in values.items():
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)


SUMMARY_FILES = ("critical.json", "experts.json", "search.json", "summary.json")  # not store.json (the store's own)


def mark_rehearsal(output: Path, name: str, model) -> None:
    """Label the study summaries of ``output`` ``"rehearsal": true`` and describe the replica next to them."""
    output = Path(output)
    for summary in (output / f for f in SUMMARY_FILES):
        if not summary.is_file():
            continue
        data = json.loads(summary.read_text())
        if isinstance(data, list):  # search.json: a list of per-site searches
            data = {"entries": data}
        atomic_write_json(summary, {**data, "rehearsal": True, "rehearsal_of": name})
    config = model.config
    atomic_write_json(output / "rehearsal.json", {
        "rehearsal": True, "rehearsal_of": name,
        "note": "random weights with the real model's structure and shrunk widths: a test of the code path, "
                "not a result of the real model",
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, list))},
    })
