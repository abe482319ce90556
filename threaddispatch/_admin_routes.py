"""The admin app's routing: a table of routes, each a method and path pattern with its handler and parameters.

A :class:`RouteTable` is built once from :class:`Route` declarations (the app declares
its own) and is immutable. :meth:`RouteTable.find` matches a path to a route, answering
404 for an unknown path and 405 (with ``Allow``) for a known path with another method;
HEAD is served by a GET route. Thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from threaddispatch._admin_params import Request
from threaddispatch._wsgi import HttpError, bad

C = TypeVar("C")


@dataclass(frozen=True)
class Route(Generic[C]):
    """``method`` on paths matching ``pattern`` (shown as ``template``): ``handler(context, request)``.

    ``params`` are the parameters the route accepts; the pattern's groups reach the
    handler as ``request.groups``.
    """

    method: str
    template: str
    pattern: str
    handler: Callable[[C, Request], tuple[int, object]]
    params: frozenset[str] = frozenset()

    def refuse_unknown(self, params: Mapping[str, object]) -> None:
        """400 for the first parameter (by name) this route does not accept."""
        unknown = sorted(set(params) - self.params)
        if unknown:
            raise bad(unknown[0], f"unknown parameter {unknown[0]!r} for {self.method} {self.template}")


def route(
    method: str, template: str, pattern: str, handler: Callable[[C, Request], tuple[int, object]],
    params: Iterable[str] = (),
) -> Route[C]:  # fmt: skip
    """A :class:`Route` accepting ``params``."""
    return Route(method, template, pattern, handler, frozenset(params))


@dataclass(frozen=True)
class _Path(Generic[C]):
    """One path pattern and its routes by method."""

    pattern: re.Pattern[str]
    template: str
    methods: Mapping[str, Route[C]]


class RouteTable(Generic[C]):
    """Routes by path pattern, tried in the order first declared; the first pattern matching a path wins."""

    def __init__(self, routes: Iterable[Route[C]]) -> None:
        paths: dict[str, dict[str, Route[C]]] = {}
        for entry in routes:
            paths.setdefault(entry.pattern, {})[entry.method] = entry
        self._paths = tuple(
            _Path(re.compile(pattern), list(methods.values())[-1].template, dict(methods))
            for pattern, methods in paths.items()
        )

    def listing(self, prefix: str) -> list[str]:
        """Every route as ``"METHOD <prefix><template>"``, in declaration order."""
        return [f"{method} {prefix}{path.template}" for path in self._paths for method in path.methods]

    def find(self, method: str, path: str) -> tuple[Route[C], tuple[str, ...]]:
        """The route for ``method`` (upper case) on ``path`` and the pattern's groups; else a 404 or 405."""
        for candidate in self._paths:
            match = candidate.pattern.fullmatch(path)
            if match is None:
                continue
            found = candidate.methods.get("GET" if method == "HEAD" else method)
            if found is None:
                allowed = ", ".join(sorted({*candidate.methods, *(["HEAD"] if "GET" in candidate.methods else [])}))
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {candidate.template}; "
                                f"allowed: {allowed}", headers=[("Allow", allowed)])  # fmt: skip
            return found, match.groups()
        raise HttpError(404, "not_found", f"no such route: {path}")
