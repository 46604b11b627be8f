"""The prompt protocols an evaluation scores under: ``none``, ``point:N``, ``box``, ``box:J``, ``text``,
``text:name`` and ``interactive[:N]``, parsed from their command-line spelling."""

from __future__ import annotations

from dataclasses import dataclass

from samadapt.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    kind: str  # none | point | box | text | interactive
    points: int = 1  # point: clicks per object; interactive: corrective clicks after the box
    jitter: int = 0
    phrase: str = ""  # text: heldout | name

    def __str__(self) -> str:
        if self.kind == "text":
            return f"text:{self.phrase}"
        if self.kind in ("point", "interactive"):
            return f"{self.kind}:{self.points}"
        if self.kind == "box" and self.jitter:
            return f"box:{self.jitter}"
        return self.kind


def parse_protocol(text: str) -> Protocol:
    """``none``, ``point:N``, ``box``, ``box:J``, ``text`` (= ``text:heldout``), ``text:name`` or ``interactive[:N]``
    (a 3D box, then N corrective clicks; default 5: ``eval.interactive``)."""
    name, _, arg = text.partition(":")
    try:
        if name == "none" and not arg:
            return Protocol("none")
        if name == "text" and arg in ("", "heldout", "name"):
            return Protocol("text", phrase=arg or "heldout")
        if name == "point":
            count = int(arg or 1)
            if count >= 1:
                return Protocol("point", points=count)
        if name == "box":
            return Protocol("box", jitter=int(arg or 0))
        if name == "interactive":
            count = int(arg or 5)
            if count >= 0:
                return Protocol("interactive", points=count)
    except ValueError:
        pass
    raise ConfigError(
        f"unknown prompt protocol {text!r}: use none, point:N, box, box:J, text, text:name or interactive:N"
    )
