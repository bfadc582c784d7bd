"""The one table of model roles: each model's names in the paper, the API, the CLI and the defaults.

====================  ===========  =====================  ==========  ===========================
role (``ModelSet``,   symbol       ``generate()``         CLI flag    ``sss_ext.models.
counters, observer)   (paper)      argument                           DefaultModels`` attribute
====================  ===========  =====================  ==========  ===========================
``target``            ``q``        ``target``             ``--target``  ``target``
``draft``             ``r``        ``draft``              ``--draft``   ``draft``
``ref``               ``d``        ``ref_model``          ``--ref``     ``ref_draft``
====================  ===========  =====================  ==========  ===========================

``draft`` is the aligned draft that proposes tokens; ``ref`` is the reference draft the
reward shift divides by (``(r/d)^lambda``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    name: str      # ModelSet attribute, forward-counter and observer name
    symbol: str    # the paper's letter
    argument: str  # keyword of sss_ext.generate / resolve_models
    flag: str      # command-line flag that gives its directory
    default: str   # attribute of sss_ext.models.DefaultModels


ROLES = (
    Role("target", "q", "target", "--target", "target"),
    Role("draft", "r", "draft", "--draft", "draft"),
    Role("ref", "d", "ref_model", "--ref", "ref_draft"),
)
#: generate() argument -> Role
BY_ARGUMENT = {role.argument: role for role in ROLES}
#: role name -> Role
BY_NAME = {role.name: role for role in ROLES}
#: the generate() model arguments, in table order
MODEL_ARGUMENTS = tuple(role.argument for role in ROLES)
