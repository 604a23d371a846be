"""Names of what sparse execution can sparsify: the linear input groups of a decoder layer.

A group is the set of ``nn.Linear`` layers that read one tensor (``common.core.sites.LINEAR_INPUTS``):
``attention`` (q, k, v), ``attention_output`` (o), ``input`` (gate, up: the FFN input site) and
``intermediate`` (down: the intermediate site). ``all_linear`` names all four, TEAL style.
"""

from __future__ import annotations

from common.core.sites import LINEAR_INPUTS

LINEAR_GROUPS = LINEAR_INPUTS
ALL_LINEAR = "all_linear"
ATTENTION_GROUPS = tuple(group for group in LINEAR_GROUPS if group not in ("input", "intermediate"))


def expand_groups(groups) -> tuple[str, ...]:
    """Validate group names and expand ``all_linear``, in the order given."""
    names = [groups] if isinstance(groups, str) else list(groups)
    expanded: list[str] = []
    for name in names:
        if name != ALL_LINEAR and name not in LINEAR_GROUPS:
            raise ValueError(f"unknown linear input group {name!r}; choose from {', '.join(LINEAR_GROUPS)} "
                             f"or {ALL_LINEAR}")
        for group in LINEAR_GROUPS if name == ALL_LINEAR else (name,):
            if group not in expanded:
                expanded.append(group)
    return tuple(expanded)
