"""The Engine API's `filters` query: the keys each endpoint accepts, and dockerd's matching rules.

dockerd refuses a key an endpoint does not know (`invalid filter 'foo'`, 400) instead of
ignoring it; ignoring it would make `docker network prune --filter lable=keep` (a typo) prune
every network. The one exception is `/events`, which takes any key, as dockerd's does. The rules below are dockerd's (moby's `api/types/filters`): *labels* are
``key`` or ``key=value``, all must hold; *fuzzy* is a prefix of an ID or a name; times are Unix
seconds, RFC 3339 or a duration back from now (``10m``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable, Mapping

Filters = dict[str, list[str]]

CONTAINERS = frozenset({"ancestor", "before", "expose", "exited", "health", "id", "isolation", "is-task", "label",
                        "name", "network", "publish", "since", "status", "volume"})
CONTAINER_PRUNE = frozenset({"until", "label", "label!"})
IMAGES = frozenset({"before", "dangling", "label", "label!", "reference", "since", "until"})
IMAGE_PRUNE = frozenset({"dangling", "until", "label", "label!"})
NETWORKS = frozenset({"dangling", "driver", "id", "label", "name", "scope", "type"})
NETWORK_PRUNE = frozenset({"until", "label", "label!"})
VOLUMES = frozenset({"dangling", "driver", "label", "name"})
VOLUME_PRUNE = frozenset({"label", "label!", "all"})
#: The container states the ``status`` filter takes.
STATUSES = frozenset({"created", "restarting", "running", "removing", "paused", "exited", "dead"})

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


class FilterError(ValueError):
    """A filters query that is not JSON, or names a key or value the endpoint does not take."""


def parse(raw: str | None, accepted: frozenset[str] | None) -> Filters:
    """The query's ``filters`` as ``{key: [values]}``; both of Docker's spellings (a list, or
    the older ``{value: true}`` map) are read. ``accepted`` None takes any key."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise FilterError("invalid filter: the filters parameter is not JSON") from None
    if not isinstance(data, dict):
        raise FilterError("invalid filter: the filters parameter is not a JSON object")
    out: Filters = {}
    for key, values in data.items():
        if accepted is not None and key not in accepted:
            raise FilterError(f"invalid filter '{key}'")
        if isinstance(values, list):
            out[key] = [str(v) for v in values]
        elif isinstance(values, dict):
            out[key] = [str(v) for v, on in values.items() if on]
        else:
            raise FilterError(f"invalid filter '{key}': its values are not a list")
    return out


def labels_match(labels: Mapping[str, str] | None, wanted: Iterable[str]) -> bool:
    """Every ``key`` or ``key=value`` in ``wanted`` holds for ``labels``."""
    labels = labels or {}
    for f in wanted:
        key, eq, value = f.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


def labels_pass(labels: Mapping[str, str] | None, flt: Filters) -> bool:
    """The ``label`` (all must hold) and ``label!`` (none may hold) filters together."""
    return (labels_match(labels, flt.get("label") or ())
            and not any(labels_match(labels, [f]) for f in flt.get("label!") or ()))


def fuzzy(values: Iterable[str], *sources: str | None) -> bool:
    """dockerd's FuzzyMatch: a value equal to or a prefix of one of the sources."""
    return any(s and s.startswith(v) for v in values for s in sources)


def timestamp(value: str, now: float | None = None) -> float:
    """A filter's time: Unix seconds (``1700000000.5``), RFC 3339 or a date (no zone: UTC, the
    guest's), or a Go duration back from now (``90s``, ``10m``, ``1h30m``)."""
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if value and _DURATION.sub("", value) == "":
        return (time.time() if now is None else now) - sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(value))
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(f'failed to parse value as time or duration: "{value}"') from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()  # the guest's zone is UTC


def until(flt: Filters) -> float | None:
    """The prune filters' ``until``: only what was created before it goes."""
    return timestamp(flt["until"][0]) if flt.get("until") else None


def boolean(flt: Filters, key: str) -> bool | None:
    """A yes/no filter's value (Go's ParseBool spellings), None when it is not given."""
    values = flt.get(key)
    if not values:
        return None
    value = values[0]
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise FilterError(f"invalid filter '{key}={value}'")


def check_containers(flt: Filters) -> None:
    """The container list's values that dockerd refuses rather than match nothing."""
    for v in flt.get("status") or ():
        if v not in STATUSES:
            raise FilterError(f"invalid filter 'status={v}'")
    for v in flt.get("health") or ():
        if v not in ("starting", "healthy", "unhealthy", "none"):
            raise FilterError(f"Unrecognised filter value for health: {v}")
    for v in flt.get("exited") or ():
        if not re.fullmatch(r"[+-]?\d+", v):
            raise FilterError(f'strconv.Atoi: parsing "{v}": invalid syntax')
    boolean(flt, "is-task")
