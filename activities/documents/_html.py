"""HTML to text with Python's html.parser: visible text only
(scripts, styles and other non-content elements are dropped, never run),
block elements on their own lines, tables as Markdown rows."""

from __future__ import annotations

from html.parser import HTMLParser

from activities.documents._limits import Budget

__all__ = ["html_text"]

_HIDDEN = {"script", "style", "template", "noscript", "iframe", "object", "embed", "svg", "math", "head", "select"}
_BLOCKS = {
    "p", "div", "br", "li", "ul", "ol", "section", "article", "header", "footer", "nav", "aside", "main",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "form", "hr", "dl", "dt", "dd", "title",
}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "source", "track", "wbr", "param"}


class _Text(HTMLParser):
    def __init__(self, budget: Budget) -> None:
        super().__init__(convert_charrefs=True)
        self._budget = budget
        self._hidden: list[str] = []
        self.lines: list[str] = []
        self._line: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._rows_in_table = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag in ("br", "hr"):
                self._flush()
            return
        if self._hidden or tag in _HIDDEN:
            self._hidden.append(tag)
            return
        if tag == "table":
            self._flush()
            self._rows_in_table = 0
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag in _BLOCKS:
            self._flush()
            if tag[0] == "h" and tag[1:].isdigit():
                self._line.append("#" * int(tag[1:]) + " ")
        elif tag == "li":
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._hidden:
            if tag == self._hidden[-1]:
                self._hidden.pop()
            return
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()).replace("|", "\\|"))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.lines.append(self._budget.take("| " + " | ".join(self._row) + " |"))
                if self._rows_in_table == 0:
                    self.lines.append("|" + "---|" * len(self._row))
                self._rows_in_table += 1
            self._row = None
        elif tag in _BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        if self._cell is not None:
            self._cell.append(data)
        elif self._row is None:
            self._line.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._line).split())
        self._line = []
        if text and text.strip("#").strip():
            self.lines.append(self._budget.take(text))

    def finish(self) -> str:
        self.close()
        self._flush()
        return "\n".join(self.lines)


def html_text(markup: str, budget: Budget) -> str:
    parser = _Text(budget)
    # Fed in slices so the time budget is checked on a large page too.
    for start in range(0, len(markup), 1 << 16):
        budget.check_time()
        parser.feed(markup[start : start + (1 << 16)])
    return parser.finish()
