"""agent/filters.py: the Engine API's filters query, as dockerd reads and refuses it."""

from __future__ import annotations

import json

import pytest

from agent import filters
from agent.filters import FilterError


def q(value: object) -> str:
    return json.dumps(value)


def test_both_spellings_are_read_and_unknown_keys_refused() -> None:
    assert filters.parse(q({"label": ["a=b", "c"]}), filters.CONTAINER_PRUNE) == {"label": ["a=b", "c"]}
    assert filters.parse(q({"label": {"a=b": True, "off": False}}), filters.CONTAINER_PRUNE) == {"label": ["a=b"]}
    assert filters.parse(None, filters.NETWORKS) == {} and filters.parse("", filters.NETWORKS) == {}
    with pytest.raises(FilterError, match="^invalid filter 'lable'$"):  # a typo must not prune everything
        filters.parse(q({"lable": ["keep"]}), filters.NETWORK_PRUNE)
    with pytest.raises(FilterError, match="^invalid filter 'until'$"):  # volumes keep no creation time
        filters.parse(q({"until": ["1h"]}), filters.VOLUME_PRUNE)
    assert filters.parse(q({"anything": ["x"]}), None) == {"anything": ["x"]}  # /events takes any key
    for bad in ("{", "[1]", q({"label": "a"})):
        with pytest.raises(FilterError, match="^invalid filter"):
            filters.parse(bad, filters.CONTAINERS)


def test_labels_fuzzy_and_booleans() -> None:
    labels = {"a": "1", "b": ""}
    assert filters.labels_match(labels, ["a", "a=1", "b="]) and filters.labels_match(None, [])
    assert not filters.labels_match(labels, ["a=2"]) and not filters.labels_match(labels, ["c"])
    assert filters.labels_pass(labels, {"label": ["a"], "label!": ["a=2"]})
    assert not filters.labels_pass(labels, {"label!": ["a=1"]}) and not filters.labels_pass({}, {"label": ["a"]})
    assert filters.fuzzy(["web"], "0123", "web-1") and filters.fuzzy(["01"], "0123", None)
    assert not filters.fuzzy(["eb"], "0123", "web")
    assert filters.boolean({"dangling": ["1"]}, "dangling") is True
    assert filters.boolean({"dangling": ["False"]}, "dangling") is False
    assert filters.boolean({}, "dangling") is None
    with pytest.raises(FilterError, match="^invalid filter 'dangling=maybe'$"):
        filters.boolean({"dangling": ["maybe"]}, "dangling")


def test_times_are_unix_rfc3339_dates_or_durations() -> None:
    assert filters.timestamp("1700000000.5") == 1700000000.5
    assert filters.timestamp("2023-11-14T22:13:20Z") == 1700000000
    assert filters.timestamp("2023-11-14T22:13:20.123456789Z") == pytest.approx(1700000000.123456)
    assert filters.timestamp("2023-11-15T00:13:20+02:00") == 1700000000
    assert filters.timestamp("2023-11-14") == 1699920000  # no zone: the guest's, UTC
    assert filters.timestamp("1h30m", now=10000) == 10000 - 5400
    assert filters.timestamp("250ms", now=10) == pytest.approx(9.75)
    for bad in ("yesterday", "", "10 m", "1d"):
        with pytest.raises(FilterError, match="^failed to parse value as time or duration"):
            filters.timestamp(bad)
    assert filters.until({}) is None


def test_container_values_refused_as_dockerd_does() -> None:
    filters.check_containers({"status": ["running", "exited"], "health": ["none"], "exited": ["0", "137"],
                              "is-task": ["false"]})
    for flt, message in (({"status": ["bogus"]}, "invalid filter 'status=bogus'"),
                         ({"health": ["fine"]}, "Unrecognised filter value for health: fine"),
                         ({"exited": ["abc"]}, 'strconv.Atoi: parsing "abc": invalid syntax'),
                         ({"is-task": ["maybe"]}, "invalid filter 'is-task=maybe'")):
        with pytest.raises(FilterError) as info:
            filters.check_containers(flt)
        assert str(info.value) == message
