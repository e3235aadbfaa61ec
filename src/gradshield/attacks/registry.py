"""The attack registry: each attack declares, next to its code, what a suite runner needs to know.

An attack module decorates its public function with :func:`register`; importing
:mod:`gradshield.attacks` imports every attack module, so :func:`registered` then lists them all.
Suites (:mod:`gradshield.suites`) read attack names and metadata from here and nowhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from gradshield.errors import GradshieldError

SPACES = ("additive", "flow")
#: Diagnostic kinds (:mod:`gradshield.diagnostics`) an attack may declare as its default.
KINDS = ("single-step", "iterative", "gradient-free", "transfer", "bpda", "noise")


@dataclass(frozen=True)
class AttackInfo:
    """What a suite runner needs to know about an attack.

    - ``space``: "additive" (budgets on the [0, 1] pixel scale) or "flow" (pixels);
    - ``norms``: the norms it takes (the first is the default; one entry: a fixed norm, and the
      function then takes no ``norm`` argument);
    - ``bounded``: it takes ``eps`` and stays within it; else it is a minimum-size attack whose
      success the runner counts within the suite entry's budget when one is given;
    - ``kind``: its default diagnostic kind.
    """

    name: str
    function: Callable
    space: str
    norms: tuple[str, ...]
    bounded: bool
    kind: str

    @property
    def fixed_norm(self) -> str | None:
        return self.norms[0] if len(self.norms) == 1 else None


_REGISTRY: dict[str, AttackInfo] = {}


def register(*, space: str, norms: tuple[str, ...], kind: str, bounded: bool = True,
             name: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator declaring an attack function's suite metadata (see :class:`AttackInfo`); the
    function itself is returned unchanged. The name defaults to the function's."""
    if space not in SPACES or kind not in KINDS or not norms:
        raise GradshieldError(f"register: space must be one of {SPACES}, kind one of {KINDS}, norms "
                              f"non-empty; got {space!r}, {kind!r}, {norms!r}")

    def decorate(function: Callable) -> Callable:
        key = name or function.__name__
        if key in _REGISTRY and _REGISTRY[key].function is not function:
            raise GradshieldError(f"attack {key!r} is registered twice")
        _REGISTRY[key] = AttackInfo(key, function, space, tuple(norms), bounded, kind)
        return function

    return decorate


def registered() -> dict[str, AttackInfo]:
    """Every registered attack by name (a copy)."""
    import gradshield.attacks  # noqa: F401  (its import registers every attack module)

    return dict(_REGISTRY)


def attack_info(name: str) -> AttackInfo:
    """The metadata of a registered attack, or a GradshieldError suggesting the closest names."""
    attacks = registered()
    if name not in attacks:
        close = difflib.get_close_matches(str(name), attacks, n=3)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise GradshieldError(f"unknown attack {name!r}; {hint}choose one of {sorted(attacks)}")
    return attacks[name]
