"""A criterion keeps its colour whatever else a figure draws, and no two criteria of one figure share one."""

from common.analysis.palette import criterion_colors, criterion_order


def test_a_criterion_keeps_its_colour_whatever_else_is_drawn():
    alone = criterion_colors(["teal"])["teal"]
    assert criterion_colors(["wina", "teal", "magnitude-topp"])["teal"] == alone
    assert criterion_colors(["gate-topk", "teal", "centred-maxp"])["teal"] == alone


def test_criteria_of_one_figure_get_distinct_colours_and_the_baseline_comes_first():
    names = ["wina", "gate-topk", "larosa", "scap", "magnitude-topp", "cats", "teal", "centred-maxp"]
    colors = criterion_colors(names)
    assert len(set(colors.values())) == len(names)
    assert criterion_order(names) == ["magnitude-topp", "teal", "cats", "scap", "wina", "larosa", "centred-maxp",
                                      "gate-topk"]
