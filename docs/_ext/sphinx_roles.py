"""A griffe extension: pamphlet's docstrings use Sphinx roles; mkdocstrings reads Markdown.

``:class:`~pamphlet.PamError``` becomes a cross-reference to the object
(``[PamError][pamphlet.PamError]``), and a role naming something the reference
does not show becomes plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`(~?)([\w.]+)`")


# An item property, ``rhost = _StringItem(Item.RHOST, "The host ...")``: its
# text is the docstring help() shows at run time, and the reference's too.
_STRING_ITEM = re.compile(r'^_StringItem\(\s*Item\.\w+,\s*(["\'])(.*)\1\s*\)$', re.S)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute:
            item = _STRING_ITEM.match(str(getattr(obj, "value", "") or ""))
            if item is not None:
                obj.docstring = griffe.Docstring(item.group(2).replace("\\'", "'"), parent=obj)
        if obj.docstring is None:
            return
        module = obj.module.path if not obj.is_module else obj.path
        obj.docstring.value = _ROLE.sub(
            lambda match: _link(match.group(1) == "~", match.group(2), obj, module),
            obj.docstring.value,
        )


def _link(short: bool, target: str, obj: griffe.Object, module: str) -> str:
    shown = target.rsplit(".", 1)[-1] if short else target
    if "." not in target:
        # A bare name: a member of the same class or module.
        parent = obj.parent if obj.is_function or obj.is_attribute else obj
        candidates = [f"{parent.path}.{target}" if parent else target, f"{module}.{target}"]
    else:
        candidates = [target]
    for path in candidates:
        if any(part.startswith("_") for part in path.split(".")):
            continue  # private: not in the reference
        try:
            obj.modules_collection[path]
        except (KeyError, ValueError):
            continue
        return f"[`{shown}`][{path}]"
    return f"`{shown}`"
