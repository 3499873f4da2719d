"""Pure helpers for the docker-compatible CLI: flag values, exit codes, table formatting.

Nothing here talks to the engine, so every function is unit-tested on its own
(tests/unit/test_engine_cli.py). Error messages follow the docker CLI's wording.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vmkit.errors import ConfigError

# docker's exit codes for `run` / `create`
EXIT_ENGINE = 125  # the engine refused (bad flag, no such image, create failed)
EXIT_CANNOT_EXEC = 126  # the command was found but could not be run
EXIT_NOT_FOUND = 127  # the command was not found


class FlagError(ConfigError):
    """A bad flag value (docker: `invalid argument "X" for "--flag" flag: ...`)."""


def _invalid(value: str, flag: str, why: str) -> FlagError:
    return FlagError(f'invalid argument "{value}" for "{flag}" flag: {why}')


# --- sizes -------------------------------------------------------------------------------
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?$", re.IGNORECASE)
_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_bytes(value: str, flag: str = "--memory") -> int:
    """docker's RAMInBytes: ``32m`` -> 33554432; units b/k/m/g/t/p (binary), case-insensitive."""
    m = _SIZE.match(value.strip())
    if not m:
        raise _invalid(value, flag, f"invalid size: '{value}'")
    n = float(m.group(1)) * _BINARY[m.group(2).lower()]
    return int(n)


def parse_memory(value: str, flag: str = "-m, --memory") -> int:
    n = parse_bytes(value, flag)
    if n < 6 * 1024 * 1024:
        raise FlagError("Minimum memory limit allowed is 6MB")
    return n


def parse_swap(value: str) -> int:
    """``--memory-swap``: a size, or -1 for unlimited swap."""
    return -1 if value.strip() == "-1" else parse_bytes(value, "--memory-swap")


def parse_cpus(value: str) -> int:
    """``--cpus 1.5`` -> NanoCpus 1500000000."""
    try:
        f = float(value)
    except ValueError:
        raise _invalid(value, "--cpus", f"failed to parse {value} as a rational number") from None
    if not math.isfinite(f) or f < 0:
        raise _invalid(value, "--cpus", f"failed to parse {value} as a rational number")
    nano = round(f * 1e9)
    if f and nano == 0:
        raise _invalid(value, "--cpus", "value is too precise")
    return nano


def parse_int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _invalid(value, flag, f'strconv.ParseInt: parsing "{value}": invalid syntax') from None


def parse_restart(value: str) -> dict[str, Any]:
    """``no|always|unless-stopped|on-failure[:N]`` -> HostConfig.RestartPolicy."""
    name, _, count = value.partition(":")
    if name not in ("no", "always", "unless-stopped", "on-failure", ""):
        raise FlagError(f"invalid restart policy '{value}'")
    if count:
        if name != "on-failure":
            raise FlagError(f"invalid restart policy format: maximum retry count can only be used with 'on-failure'")
        try:
            n = int(count)
        except ValueError:
            raise FlagError(f"invalid restart policy format: maximum retry count must be an integer") from None
        if n < 0:
            raise FlagError("invalid restart policy format: maximum retry count cannot be negative")
        return {"Name": name, "MaximumRetryCount": n}
    if value.endswith(":"):
        raise FlagError("invalid restart policy format: no policy provided before colon")
    return {"Name": name or "no", "MaximumRetryCount": 0}


# --- env, labels ---------------------------------------------------------------------------
def env_item(item: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``-e KEY=VAL`` stays; ``-e KEY`` takes the value from our environment, or is dropped."""
    environ = os.environ if environ is None else environ
    if "=" in item:
        key = item.split("=", 1)[0]
        if not key:
            raise FlagError(f"invalid environment variable: {item}")
        return item
    if not item.strip():
        raise FlagError(f"invalid environment variable: {item}")
    return f"{item}={environ[item]}" if item in environ else None


def parse_env_file(path: str | Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """docker's env-file format: ``KEY=VALUE`` lines (value taken literally, no quote
    processing), ``KEY`` alone means "from my environment", ``#`` comments and blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise FlagError(f"open {path}: {exc.strerror.lower() if exc.strerror else exc}") from None
    out: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key = line.split("=", 1)[0]
        if not key or any(c.isspace() for c in key):
            raise FlagError(f"invalid environment variable in {path} line {n}: {key!r} contains whitespaces")
        value = env_item(line, environ)
        if value is not None:
            out.append(value)
    return out


def build_env(env: Iterable[str], env_files: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Env files first, then ``-e`` (later wins, as in docker)."""
    out: list[str] = []
    for f in env_files:
        out += parse_env_file(f, environ)
    for item in env:
        v = env_item(item, environ)
        if v is not None:
            out.append(v)
    return out


def parse_add_host(item: str) -> str:
    """``--add-host name:ip`` (or ``name=ip``) -> the engine's ``name:ip``."""
    import ipaddress

    name, sep, addr = item.partition("=") if "=" in item else item.partition(":")
    if not sep or not name or not addr:
        raise FlagError(f"bad format for add-host: {item!r} (want HOST:IP)")
    if addr != "host-gateway":
        try:
            ipaddress.ip_address(addr.strip("[]"))
        except ValueError:
            raise FlagError(f"invalid IP address in add-host: {addr!r}") from None
    return f"{name}:{addr.strip('[]')}"


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, _, v = item.partition("=")
        if not k:
            raise FlagError(f"invalid label: {item}")
        out[k] = v
    return out


def parse_ulimit(item: str) -> dict[str, Any]:
    """``--ulimit NAME=SOFT[:HARD]`` -> {Name, Soft, Hard} (-1 is unlimited); the engine knows
    which names exist."""
    name, eq, value = item.partition("=")
    soft, _, hard = value.partition(":")
    try:
        if not (eq and name):
            raise ValueError
        n_soft = int(soft)
        n_hard = int(hard) if hard else n_soft
    except ValueError:
        raise _invalid(item, "--ulimit", f"invalid ulimit argument: {item}") from None
    return {"Name": name, "Soft": n_soft, "Hard": n_hard}


def parse_pairs(items: Iterable[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` flags (``--sysctl``) as a dict."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise _invalid(item, flag, f"{item} is not a KEY=VALUE pair")
        out[key] = value
    return out


def parse_tmpfs(items: Iterable[str]) -> dict[str, str]:
    """``--tmpfs PATH[:OPTIONS]`` -> HostConfig.Tmpfs."""
    return {path: options for path, _, options in (item.partition(":") for item in items)}


def parse_expose(items: Iterable[str]) -> dict[str, dict]:
    """``--expose PORT[-PORT][/PROTO]`` -> ExposedPorts."""
    out: dict[str, dict] = {}
    for item in items:
        ports, _, proto = item.partition("/")
        first, dash, last = ports.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or proto not in ("", "tcp", "udp", "sctp"):
            raise _invalid(item, "--expose", f"invalid range format for --expose: {item}")
        for port in range(int(first), int(last or first) + 1):
            out[f"{port}/{proto or 'tcp'}"] = {}
    return out


# --- ports -----------------------------------------------------------------------------
def parse_publish(items: Iterable[str]) -> tuple[dict[str, dict], dict[str, list[dict[str, str]]]]:
    """``-p [ip:][host:]ctr[/proto]`` -> (ExposedPorts, PortBindings), passed through as-is."""
    exposed: dict[str, dict] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    for item in items:
        spec, _, proto = item.partition("/")
        proto = proto or "tcp"
        if proto not in ("tcp", "udp", "sctp"):
            raise FlagError(f"invalid proto: {proto}")
        ip = ""
        if spec.startswith("["):  # [::1]:8080:80
            end = spec.find("]:")
            if end < 0:
                raise FlagError(f"invalid port format: {item}")
            ip, spec = spec[1:end], spec[end + 2:]
            parts = spec.split(":")
            if len(parts) != 2:
                raise FlagError(f"invalid port format: {item}")
            host, ctr = parts
        else:
            parts = spec.split(":")
            if len(parts) == 1:
                host, ctr = "", parts[0]
            elif len(parts) == 2:
                host, ctr = parts
            elif len(parts) == 3:
                ip, host, ctr = parts
            else:
                raise FlagError(f"invalid port format: {item}")
        if ctr and not re.fullmatch(r"\d+(-\d+)?", ctr):
            raise FlagError(f"invalid containerPort: {ctr}")
        if host and not re.fullmatch(r"\d+(-\d+)?", host):
            raise FlagError(f"invalid hostPort: {host}")
        if not ctr:
            raise FlagError(f"no port specified: {item}<empty>")
        for cport, hport in _pair_ranges(item, ctr, host):
            key = f"{cport}/{proto}"
            exposed[key] = {}
            bindings.setdefault(key, []).append({"HostIp": ip, "HostPort": hport})
    return exposed, bindings


def _span(text: str, item: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not (0 < a <= b <= 65535):
        raise FlagError(f"invalid port range: {text} in {item}")
    return a, b


def _pair_ranges(item: str, ctr: str, host: str) -> list[tuple[int, str]]:
    """docker's pairing: ``8080-8081:80-81`` maps one to one; ``8000-8010:80`` lets the
    engine take the first free host port of the range for 80; ``80-81`` picks any ports."""
    c0, c1 = _span(ctr, item)
    if not host:
        return [(c, "") for c in range(c0, c1 + 1)]
    h0, h1 = _span(host, item)
    if c0 == c1:
        return [(c0, host)]
    if h1 - h0 != c1 - c0:
        raise FlagError(f"invalid ranges specified for container and host Ports: {ctr} and {host}")
    return [(c0 + i, str(h0 + i)) for i in range(c1 - c0 + 1)]


# --- exit codes ---------------------------------------------------------------------------
def start_error_exit_code(message: str) -> int:
    """The docker CLI's rule for a failed `run`/`start`: 127 when the command is missing,
    126 when it cannot be executed, 125 otherwise."""
    m = message.removeprefix("Error response from daemon: ")
    if ("executable file not found" in m or "no such file or directory" in m
            or "system cannot find the file specified" in m):
        return EXIT_NOT_FOUND
    if "permission denied" in m or "is a directory" in m:
        return EXIT_CANNOT_EXEC
    return EXIT_ENGINE


# --- time ---------------------------------------------------------------------------------
_DUR = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DUR_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_since(value: str, now: float | None = None) -> str:
    """``--since``/``--until``: a Go duration (``10m``, ``1h30m``) relative to now, an RFC 3339
    time or date, or a unix timestamp -> the API's ``seconds[.nanos]`` string."""
    now = time.time() if now is None else now
    v = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", v):
        return v
    if _DUR.fullmatch(v) or (v and "".join(m.group(0) for m in _DUR.finditer(v)) == v):
        secs = sum(float(n) * _DUR_S[u] for n, u in _DUR.findall(v))
        return f"{now - secs:.9f}".rstrip("0").rstrip(".")
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise FlagError(f'invalid value for "since": failed to parse value as time or duration: "{value}"') from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return f"{dt.timestamp():.9f}".rstrip("0").rstrip(".")


def human_duration(seconds: float) -> str:
    """Go's units.HumanDuration, as `docker ps` uses it."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // 24 // 7} weeks"
    if h < 24 * 365 * 2:
        return f"{h // 24 // 30} months"
    return f"{h // 24 // 365} years"


def human_size(n: float) -> str:
    """Go's units.HumanSize (decimal, 3 significant digits): 1990000 -> 1.99MB."""
    return _scaled(n, 1000, ("B", "kB", "MB", "GB", "TB", "PB"), 3)


def bytes_size(n: float) -> str:
    """Go's units.BytesSize (binary, 4 significant digits), as `docker stats` shows memory:
    593920 -> 580KiB, 67108864 -> 64MiB."""
    return _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"), 4)


def _scaled(n: float, base: int, units: tuple[str, ...], digits: int) -> str:
    i = 0
    while n >= base and i < len(units) - 1:
        n /= base
        i += 1
    return f"{n:.{digits}g}{units[i]}"


def table(rows: list[list[str]]) -> str:
    """docker's tabwriter layout: columns padded to the widest cell plus three spaces."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w + 3) for c, w in zip(r[:-1], widths[:-1])] + [r[-1]]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def truncate(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


_TEMPLATE = re.compile(r"\{\{\s*(json\s+)?\.([\w.]*)\s*\}\}")


def render_template(template: str, obj: Any) -> str:
    """The small subset of Go templates people use with ``--format``: ``{{.Field.Sub}}``,
    ``{{json .Field}}`` and ``{{json .}}``; ``\\t`` and ``\\n`` escapes."""
    def value(path: str) -> Any:
        cur = obj
        for part in filter(None, path.split(".")):
            if isinstance(cur, Mapping):
                if part not in cur:
                    raise FlagError(f"template: :1: executing \"\" at <.{path}>: map has no entry for key \"{part}\"")
                cur = cur[part]
            else:
                raise FlagError(f"template: :1: can't evaluate field {part}")
        return cur

    def sub(m: re.Match[str]) -> str:
        v = value(m.group(2))
        if m.group(1):
            return json.dumps(v, separators=(",", ":"))
        if v is None:
            return "<no value>"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (dict, list)):
            return _go_repr(v)
        return str(v)

    if "{{" in template and not _TEMPLATE.search(template):
        raise FlagError(f"template parsing error: unsupported template {template!r} "
                        "(pydesk supports {{.Field}}, {{json .Field}} and json)")
    return _TEMPLATE.sub(sub, template.replace("\\t", "\t").replace("\\n", "\n"))


def _go_repr(v: Any) -> str:
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_go_repr(x)}" for k, x in v.items()) + "]"
    if isinstance(v, list):
        return "[" + " ".join(_go_repr(x) for x in v) + "]"
    return str(v)


def filters(items: list[str] | None) -> dict[str, list[str]]:
    """``--filter KEY=VALUE`` flags (repeatable) as the Engine API's filters; which keys an
    endpoint takes is the engine's to say."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FlagError(f"bad format of filter (expected name=value): {item}")
        out.setdefault(key.strip().lower(), []).append(value)
    return out
