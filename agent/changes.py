"""`--change` of `docker commit` and `docker import`: Dockerfile instructions applied to an
image's config (``CMD``, ``ENTRYPOINT``, ``ENV``, ``EXPOSE``, ``LABEL``, ``ONBUILD``, ``USER``,
``VOLUME``, ``WORKDIR``, ``STOPSIGNAL``, ``SHELL``), as dockerd applies them.

Only the instruction forms matter here, not a Dockerfile's: one instruction per change, the
JSON (exec) form or the shell form (``CMD echo hi`` is ``["/bin/sh", "-c", "echo hi"]``),
``ENV``/``LABEL`` as ``k=v`` pairs (quotes allowed) or the old ``ENV k v``. Variables are not
expanded; dockerd does not expand them in a change either.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from typing import Any

#: The instructions a change may hold; the Dockerfile's others (FROM, RUN, COPY…) need a build.
ALLOWED = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "USER", "VOLUME", "WORKDIR", "STOPSIGNAL",
           "SHELL")
_KNOWN = (*ALLOWED, "ADD", "ARG", "COPY", "FROM", "HEALTHCHECK", "MAINTAINER", "RUN")


class ChangeError(ValueError):
    """A change that is not one of the instructions above, or is malformed."""


def apply(config: dict[str, Any], changes: Iterable[str]) -> None:
    """Apply each change, in order, to ``config`` (an image config's ``config`` object)."""
    for change in changes:
        for line in change.splitlines():  # the API lets one value hold several, one per line
            if line.strip() and not line.lstrip().startswith("#"):
                _apply_one(config, line.strip())


def _apply_one(config: dict[str, Any], line: str) -> None:
    word, _, rest = line.partition(" ")
    instruction = word.upper()
    rest = rest.strip()
    if instruction not in _KNOWN:
        raise ChangeError(f"dockerfile parse error on line 1: unknown instruction: {word}")
    if instruction not in ALLOWED:
        raise ChangeError(f"{instruction.lower()} is not a valid change command")
    if not rest:
        raise ChangeError(f"{instruction} requires at least one argument")
    if instruction in ("CMD", "ENTRYPOINT"):
        config[instruction.title()] = _command(rest, config)
    elif instruction == "SHELL":
        shell = _json_list(rest)
        if shell is None:
            raise ChangeError("SHELL requires the arguments to be in JSON form")
        config["Shell"] = shell
    elif instruction == "ENV":
        env = [e for e in config.get("Env") or []]
        for key, value in _pairs(rest, "ENV"):
            env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={value}"]
        config["Env"] = env
    elif instruction == "LABEL":
        labels = dict(config.get("Labels") or {})
        labels.update(_pairs(rest, "LABEL"))
        config["Labels"] = labels
    elif instruction == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for p in rest.split():
            number, _, proto = p.partition("/")
            if not number.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
                raise ChangeError(f"Invalid containerPort: {p}")
            ports[f"{int(number)}/{proto or 'tcp'}"] = {}
        config["ExposedPorts"] = ports
    elif instruction == "VOLUME":
        volumes = dict(config.get("Volumes") or {})
        for v in _json_list(rest) or rest.split():
            if not v:
                raise ChangeError("VOLUME specified can not be an empty string")
            volumes[v] = {}
        config["Volumes"] = volumes
    elif instruction == "ONBUILD":
        config["OnBuild"] = [*(config.get("OnBuild") or []), rest]
    else:  # USER, WORKDIR, STOPSIGNAL: one value
        key = {"USER": "User", "WORKDIR": "WorkingDir", "STOPSIGNAL": "StopSignal"}[instruction]
        if instruction == "WORKDIR" and not rest.startswith("/"):
            rest = (config.get("WorkingDir") or "/").rstrip("/") + "/" + rest
        config[key] = rest


def _json_list(text: str) -> list[str] | None:
    """The exec form (a JSON list of strings), or None for the shell form."""
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # dockerd reads a malformed JSON list as the shell form too
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _command(text: str, config: dict[str, Any]) -> list[str]:
    form = _json_list(text)
    return form if form is not None else [*(config.get("Shell") or ["/bin/sh", "-c"]), text]


def _pairs(text: str, instruction: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ChangeError(f"{instruction}: {exc}") from None
    if words and "=" not in words[0]:  # the old form: ENV KEY value with spaces
        key, _, value = text.partition(" ")
        if not value.strip():
            raise ChangeError(f"{instruction} names must be followed by a value: {text}")
        return [(key, value.strip())]
    out = []
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise ChangeError(f"{instruction}: {w!r} is not KEY=VALUE")
        out.append((key, value))
    return out
