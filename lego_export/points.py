"""Named points of a model's frontier (``best``, ``balanced``, ``fast``): sampling settings by name.

``lego-export tune`` writes them into the manifest (manifest.Recommended.points); lego-run's
``--quality NAME``, the Python API's ``quality=`` and lego-serve's ``"quality": NAME`` select one.
A name stands for a whole sampling trajectory, so it combines with guidance and the tile shift but
not with a trajectory field (steps, sampler, skip, ...): giving both is an error, not a silent choice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lego_export.options import TRAJECTORY_FIELDS, OptionError, SamplingOptions, resolve

if TYPE_CHECKING:
    from lego_export.manifest import Recommended

POINT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
QUALITY_WORDS = ("elastic", "exact")  # lego-serve's other quality values: never point names


def point_names(recommended: Recommended | None) -> list[str]:
    """The names of the model's named points, as the manifest lists them."""
    return list(recommended.points) if recommended is not None else []


def point_options(recommended: Recommended | None, name: Any) -> SamplingOptions:
    """The setting of the named point; OptionError on the field ``quality`` listing the names there are."""
    names = point_names(recommended)
    if not isinstance(name, str) or name not in names:
        have = "this model has no named points (lego-export tune writes them)"
        if names:
            have = f"this model has {', '.join(names)}"
        raise OptionError("quality", f"{name!r} is not a named point: {have}")
    return recommended.points[name].options


def resolve_quality(
    given: Mapping[str, Any], recommended: Recommended | None, quality: str | None
) -> tuple[SamplingOptions, bool]:
    """options.resolve with a named point: the fields given over the point's setting (quality given),
    else over the recommended setting or the defaults. The flag: the options are the recommended setting."""
    if quality is None:
        return resolve(given, recommended.options if recommended is not None else None)
    base = point_options(recommended, quality)
    clash = sorted(set(given) & set(TRAJECTORY_FIELDS))
    if clash:
        raise OptionError("quality", f"names a whole sampling setting; give it or {clash[0]}, not both")
    options, _ = resolve(given, base)
    return options, recommended is not None and options == recommended.options
