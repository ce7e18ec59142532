"""A base for results shown as aligned text in a terminal and as HTML in notebooks."""

from __future__ import annotations


class TextAndHtml:
    """Subclasses define ``text()`` and ``html()``; HTML is rendered only when a front end asks."""

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        bundle = {"text/plain": self.text()}
        if (include is None or "text/html" in include) and not (exclude and "text/html" in exclude):
            bundle["text/html"] = self.html()
        return bundle

    def __repr__(self) -> str:
        return self.text()
