"""Error types of sovllm.

Every error a user can cause or fix is a `SovllmError` subclass whose message says what was wrong,
what was found and what to do. The CLI prints the message (one line per problem) and exits with the
error's `exit_code`; servers turn it into OpenAI-style error JSON. Nothing here imports heavy
libraries.
"""

from __future__ import annotations


class SovllmError(Exception):
    """Base class of all errors sovllm reports to users."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")

    def lines(self) -> list[str]:
        """The message as lines for the CLI (a multi-problem error has one line per problem)."""
        return str(self).splitlines() or [type(self).__name__]


class ConfigError(SovllmError):
    """The project configuration (file or `--set` override) is invalid."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = "\n".join([message, *("  " + p for p in self.problems)])
        super().__init__(message, hint=hint)


class InputError(SovllmError):
    """An input file or folder is missing, unreadable or malformed."""

    exit_code = 2


class ModelError(SovllmError):
    """A base model cannot be found, prepared or used."""


class BackendError(SovllmError):
    """An OpenAI-compatible endpoint or engine failed."""


class AdapterError(SovllmError):
    """A LoRA adapter cannot be loaded, served or trained as asked."""


class EgressBlockedError(SovllmError, PermissionError):
    """An outbound connection or name lookup to a host outside the allow-list was refused.

    It is also a `PermissionError` (an `OSError`), so network libraries treat it as a failed
    connection and surface its message instead of crashing in unexpected ways.
    """

    exit_code = 3

    def __init__(self, host: str, port: int | None = None, *, action: str = "connection"):
        self.host = host
        self.port = port
        target = host if port is None else f"{host}:{port}"
        super().__init__(
            f"egress blocked: {action} to {target} refused before anything left this machine; "
            f"sovllm talks only to 127.0.0.1, ::1, localhost and the hosts in egress.allow",
            hint=f"if {host} is your own endpoint, add '{host}' to egress.allow in sovllm.yaml",
        )


class EgressUnguardableError(EgressBlockedError):
    """A socket, child process or library the guard cannot watch was refused."""

    def __init__(self, what: str, *, hint: str = ""):
        self.host, self.port = what, None
        SovllmError.__init__(self, f"egress blocked: {what} refused: the egress guard could not check where it "
                                   f"sends data", hint=hint or None)
