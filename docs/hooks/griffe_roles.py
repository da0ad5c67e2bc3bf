"""Griffe extension (mkdocs.yml, mkdocstrings ``extensions``): Sphinx roles in docstrings become links.

fundl's docstrings write ``:func:`rnn```, ``:class:`fundl.nn.Layer``` or
``:func:`~fundl.nn.core.Layer``` (readable in ``help()``).  Here each role
whose name resolves from the docstring's scope (the object, then its parents,
as Python would) becomes an autorefs link, ``[`rnn`][fundl.nn.sequence.rnn]``;
one that does not resolve becomes plain code.  A link to an object that no API
page renders fails ``mkdocs build --strict`` -- on purpose: add it to a page.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([\w.]+)`")


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` means inside ``obj``'s docstring, or None."""
    head, _, rest = name.partition(".")
    if head == obj.package.name:
        return name
    scope = obj if isinstance(obj, (griffe.Module, griffe.Class)) else obj.parent
    try:
        path = scope.resolve(head) if scope is not None else None
    except (griffe.NameResolutionError, AttributeError, KeyError):
        return None
    if path is None or not path.startswith(obj.package.name + "."):
        return None
    return f"{path}.{rest}" if rest else path


def _link(obj: griffe.Object, match: re.Match) -> str:
    tilde, name = match.groups()
    shown = name.rsplit(".", 1)[-1] if tilde else name
    target = _resolve(obj, name)
    return f"[`{shown}`][{target}]" if target else f"`{shown}`"


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`name``` in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = ROLE.sub(lambda m, obj=obj: _link(obj, m), obj.docstring.value)
