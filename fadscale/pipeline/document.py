"""A report written once, rendered twice: a list of blocks (headings, paragraphs, tables, images, code) that
`markdown` and `html` render, so report.md and report.html say the same things in the same order."""

from __future__ import annotations

import base64
import html as escape
from dataclasses import dataclass, field


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str
    tone: str = ""  # "bad" / "good": coloured in HTML


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    tones: list[list[str]] = field(default_factory=list)  # per cell, "good" / "bad" / ""


@dataclass
class Image:
    name: str  # report-<name>.png beside report.md; embedded in report.html


@dataclass
class Code:
    lines: list[str]


Block = Heading | Paragraph | Table | Image | Code


def markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Paragraph):
            out.append(block.text + "\n")
        elif isinstance(block, Table):
            out += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            out += ["| " + " | ".join(row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, Image):
            out.append(f"![{block.name}](report-{block.name}.png)\n")
        elif isinstance(block, Code):
            out += ["```", *block.lines, "```"]
    return "\n".join(out) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}.good{color:#176e2a}.bad{color:#a3261b}img{max-width:100%}
pre{background:#f4f4f4;padding:1em;overflow-x:auto}"""


def html(blocks: list[Block], title: str, images: dict[str, bytes]) -> str:
    """One self-contained page: the images embedded as data URIs."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{escape.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            tone = f" class='{block.tone}'" if block.tone else ""
            body.append(f"<p{tone}>{escape.escape(block.text)}</p>")
        elif isinstance(block, Table):
            rows = ["<tr>" + "".join(f"<th>{escape.escape(h)}</th>" for h in block.header) + "</tr>"]
            for i, row in enumerate(block.rows):
                tones = block.tones[i] if i < len(block.tones) else []
                cells = "".join((f"<td class='{tones[j]}'>" if j < len(tones) and tones[j] else "<td>")
                                + escape.escape(cell) + "</td>" for j, cell in enumerate(row))
                rows.append(f"<tr>{cells}</tr>")
            body.append("<table>" + "".join(rows) + "</table>")
        elif isinstance(block, Image):
            data = base64.b64encode(images[block.name]).decode()
            body.append(f'<img alt="{escape.escape(block.name)}" src="data:image/png;base64,{data}">')
        elif isinstance(block, Code):
            body.append("<pre>" + escape.escape("\n".join(block.lines)) + "</pre>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
