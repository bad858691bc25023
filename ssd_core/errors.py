"""Domain errors of the core; services map them to gRPC status codes in one place."""


class SSDError(Exception):
    """Base class of the core's errors."""


class InvalidParameter(SSDError, ValueError):
    """A request or config parameter is out of range; the message names the parameter."""

    def __init__(self, name: str, value: object, why: str) -> None:
        self.name = name
        self.value = value
        super().__init__(f"invalid {name}={value!r}: {why}")


class IncompatibleModels(SSDError, ValueError):
    """Target and draft cannot be paired (vocabulary or tokenizer differ)."""
