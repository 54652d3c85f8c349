"""`text/plain; format=flowed` (RFC 3676) to the lines its writer meant.

Thunderbird, Apple Mail and many web mailers wrap long lines at about 72 characters
and mark each soft break with a space before the line end; with `delsp=yes` that space
is no part of the text either (it was inserted, often inside a word). Read as fixed
lines, an alert came out broken where the writer's mailer wrapped it
(`Disk sd` / `a failed` for `Disk sda failed`).
"""

from __future__ import annotations

SIGNATURE = "-- "  # the signature delimiter: never a soft break (RFC 3676 4.3)


def unflow(text: str, format_param: str | None, delsp_param: str | None) -> str:
    """`text` with its soft breaks joined if `format_param` is `flowed`; else as it is.

    Each line loses its space-stuffing (one leading space); a line ending in a space is
    joined with the next of the same quote depth, that space deleted when `delsp=yes`.
    Quote markers are kept once per joined line (`> ` and the depth's `>`s)."""
    if (format_param or "").strip().lower() != "flowed":
        return text
    delsp = (delsp_param or "").strip().lower() == "yes"
    out: list[str] = []
    joined: list[str] = []  # the pieces of the paragraph being joined
    depth = 0

    def flush() -> None:
        if joined:
            out.append((">" * depth + " " if depth else "") + "".join(joined))
            joined.clear()

    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        quotes = len(line) - len(line.lstrip(">"))
        content = line[quotes:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffed (or the space after quote markers)
        if joined and quotes != depth:
            flush()  # a soft break before another quote depth is a hard one (4.5)
        depth = quotes
        soft = content.endswith(" ") and content != SIGNATURE
        joined.append(content[:-1] if soft and delsp else content)
        if not soft:
            flush()
    flush()
    return "\n".join(out)
