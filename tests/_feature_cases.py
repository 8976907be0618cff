"""The reference feature cases under the names tests/test_chunked.py still uses; the table and
the factory are tests/cases.py's (:data:`cases.FEATURES`, :func:`cases.feature_case`). Remove
this module once test_chunked.py imports them from cases."""

from cases import FEATURES, row_margins
from cases import feature_case as _feature_case

__all__ = ["FEATURES", "feature_case", "row_margins"]

#: The names the feature rows had here before the two feature tables became one.
_OLD_NAMES = {"adaface": "adaface_clip", "elastic arc": "elastic_arc_none", "elastic cos": "elastic_cos_none",
              "threshold row margins": "rowm_threshold", "subcenter arcface": "subcenter_arc",
              "subcenter magface": "subcenter_magface",
              "subcenter adaface curricular": "subcenter_adaface_curricular",
              "sphere feature-norm curricular": "subcenter_sphere_curricular"}


def feature_case(name, *args, **kwargs):
    """:func:`cases.feature_case`, also under the row's old name."""
    return _feature_case(_OLD_NAMES.get(name, name), *args, **kwargs)
