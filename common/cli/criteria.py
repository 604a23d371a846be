"""The criteria of a sweep (``--criterion``): one spec and calibration step per criterion, and the
lines a sweep prints about them.

``criterion_runs`` turns ``common.cli.flags.criterion_grids`` into (spec, calibrate) pairs for
``common.cli.sweep.run_sweep``: the sweep's spec with the criterion's score, selection, sites and
values, and the calibration step of ``common.evaluation.calibration`` for a criterion that needs
one (computed when its first cell needs it, cached for the next run and the other shards).
"""

from __future__ import annotations

from dataclasses import replace

from common.evaluation.sweep import SweepSpec


def criterion_runs(spec: SweepSpec, grids, model, tokenizer, model_name: str, calibration_for=None
                   ) -> list[tuple[SweepSpec, object]]:
    """(spec, calibrate) per (criterion, sites, values) of ``grids``. ``calibration_for(criterion)``
    makes a criterion's calibration step (default: a ``Calibrator`` on the calibration text; the MoE
    study passes its per-expert column norms); None for the magnitude rule."""
    from common.evaluation.calibration import Calibrator

    runs = []
    for criterion, sites, values in grids:
        calibrate, corpus = None, None
        if not criterion.is_rule:
            if calibration_for is not None:
                calibrate = calibration_for(criterion)
            else:
                calibrate = Calibrator(model, tokenizer, model_name, criterion,
                                       tuple(values) if criterion.calibrated else ())
                corpus = calibrate.corpus_id
        runs.append((replace(spec, sites=list(sites), rule=criterion.selection, score=criterion.score,
                             grid=list(values), power=spec.power if criterion.score == "magnitude" else 1.0,
                             calibration=corpus), calibrate))
    return runs


def print_criteria(summary: dict) -> None:
    """Per site and criterion: its PPL-1% crossing [95% interval], and against magnitude top-p the
    measures decided at each measured-sparsity level (undecided ones left out)."""
    criteria = summary.get("criteria")
    if not criteria:
        return
    baseline = criteria.get("baseline")
    decided: dict[tuple[str, str], list[str]] = {}
    for row in criteria["comparisons"]:
        if row["decided"]:
            measure = row["measure"] + (f" ({row['task']})" if "task" in row else "")
            decided.setdefault((row["site"], row["criteria"][0]), []).append(
                f"{measure} at {row['level']:g} {row['difference']:+.3g} [{row['interval'][0]:+.3g}, "
                f"{row['interval'][1]:+.3g}] {row['better']}")
    print(f"criteria{f' against {baseline}' if baseline else ''} (PPL-1% crossing [95% interval]; the levels "
          "where a paired interval decides, a - b [interval] and the better one):")
    for crossing in criteria["critical"]:
        ppl = crossing.get("ppl") or {}
        interval = ppl.get("interval") or [None, None]
        reading = "-" if "crossing" not in ppl else (
            f"{ppl['crossing']:.3f} [{'-' if interval[0] is None else f'{interval[0]:.3f}'}, "
            f"{'-' if interval[1] is None else f'{interval[1]:.3f}'}]")
        key = (crossing["site"], crossing["criterion"])
        versus = "" if crossing["criterion"] == baseline or baseline is None else \
            "; " + ("; ".join(decided[key]) if key in decided else "no level decided")
        print(f"  {crossing['site']:>12} {crossing['criterion']:>18}: PPL-1% {reading}{versus}")
