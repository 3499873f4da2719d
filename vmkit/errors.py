"""Errors raised by vmkit. Every one carries a one-line message and, where it helps, a hint.

Tree::

    VMKitError
     ├── ConfigError           bad settings, flags or config file
     ├── HostError             the host lacks something (QEMU, a tool, a free port)
     │    ├── ToolNotFound     a binary is missing
     │    └── PortInUse        a host port is taken
     ├── ImageError            the guest image is missing, broken or cannot be built
     ├── VMStateError          the request does not fit the VM's state
     │    ├── AlreadyRunning
     │    └── NotRunning
     ├── LaunchError           QEMU failed to start or the guest never became ready
     ├── AgentError            the agent channel failed
     │    └── AgentTimeout
     │         └── ChannelStuck  sshd never answered a channel request: the connection is stuck
     ├── DaemonError           the host daemon is unreachable or answered an error
     └── PipeError             a Windows named pipe call failed (also an OSError)
          ├── PipeInUse        another process already serves the pipe's name
          └── PipeTimeout      a pipe read or write timed out (also a TimeoutError)
"""

from __future__ import annotations


class VMKitError(Exception):
    """Root of vmkit's errors."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint}

    @staticmethod
    def from_dict(d: dict) -> VMKitError:
        cls = _BY_NAME.get(d.get("type", ""), VMKitError)
        return cls(d.get("message") or "unknown error", hint=d.get("hint"))


class ConfigError(VMKitError):
    pass


class HostError(VMKitError):
    pass


class ToolNotFound(HostError):
    pass


class PortInUse(HostError):
    pass


class ImageError(VMKitError):
    pass


class VMStateError(VMKitError):
    pass


class AlreadyRunning(VMStateError):
    pass


class NotRunning(VMStateError):
    pass


class LaunchError(VMKitError):
    pass


class AgentError(VMKitError):
    pass


class AgentTimeout(AgentError):
    pass


class ChannelStuck(AgentTimeout):
    pass


class DaemonError(VMKitError):
    pass


class PipeError(VMKitError, OSError):
    """A named pipe call failed. It is an OSError too, so the loops written for sockets
    (``accept`` until it raises OSError, ``pump`` until OSError) treat it the same way.
    ``winerror`` is the Win32 error code (0 when none applies), ``errno`` its POSIX twin."""

    def __init__(self, message: str, *, hint: str | None = None, winerror: int = 0,
                 errno: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.winerror = winerror
        self.errno = errno


class PipeInUse(PipeError):
    pass


class PipeTimeout(PipeError, TimeoutError):
    pass


_BY_NAME = {c.__name__: c for c in (
    VMKitError, ConfigError, HostError, ToolNotFound, PortInUse, ImageError, VMStateError,
    AlreadyRunning, NotRunning, LaunchError, AgentError, AgentTimeout, ChannelStuck, DaemonError, PipeError,
    PipeInUse, PipeTimeout)}
