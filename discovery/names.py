"""Name rules shared by services, namespaces and clusters (DESIGN §3)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Always `fullmatch`: with `match`, a `$` also matches before a final "\n" ("web\n" passed).
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_EXPECTED = (
    "a DNS label: lowercase letters, digits and '-', 1-63 chars, alphanumeric at both ends"
)
DEFAULT_NAMESPACE = "default"


def is_label(value: object) -> bool:
    return isinstance(value, str) and LABEL_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A service is `<name>.<namespace>`."""

    name: str
    namespace: str = DEFAULT_NAMESPACE

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}"

    @classmethod
    def parse(cls, text: str) -> ServiceKey:
        """Parse `NAME` or `NAME.NAMESPACE`; raises ValueError naming what was expected."""
        parts = text.split(".")
        if len(parts) == 1:
            parts.append(DEFAULT_NAMESPACE)
        if len(parts) != 2 or not all(is_label(p) for p in parts):
            raise ValueError(f"{text!r} is not NAME.NAMESPACE where each part is {LABEL_EXPECTED}")
        return cls(parts[0], parts[1])
