"""Reading what a response says about itself."""

from __future__ import annotations


def csp(response) -> dict[str, str]:
    """A response's Content-Security-Policy as {directive: its values}. Browsers read directives
    in any order, and django-csp writes them in no fixed one."""
    header = response.headers.get("Content-Security-Policy", "")
    directives: dict[str, str] = {}
    for directive in header.split(";"):
        name, _, values = directive.strip().partition(" ")
        if name:
            assert name not in directives, f"{name} twice in {header!r}"
            directives[name] = values.strip()
    return directives
