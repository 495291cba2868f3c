"""Line repair, the part an evaluation needs (`slm synth repair` makes the items, distill/repair.py): a unit of
code as a module that compiles on its own, a predicted line put back into it, and the line read out of a reply.
"""

from __future__ import annotations


def compiles(source: str) -> bool:
    try:
        compile(source, "<repair>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: null bytes
        return False
    return True


def unit_source(unit_lines: list[str]) -> str:
    """A unit's lines as a module that compiles on its own: an indented unit (a method) goes under `if True:`."""
    first = next((line for line in unit_lines if line.strip()), "")
    prefix = "if True:\n" if first[:1] in (" ", "\t") else ""
    return prefix + "\n".join(unit_lines) + "\n"


def put_back(unit: str, index: int, line: str) -> str:
    """The unit with line `index` replaced, as unit_source makes it: what a repair evaluation compiles."""
    lines = unit.split("\n")
    return unit_source(lines[:index] + [line] + lines[index + 1:])


def repair_line(text: str, chat: bool) -> str:
    """The fixed line in a reply: the first line of a raw completion; in a chat answer, the first non-blank line
    of its code block (or of the answer when it has none). Leading whitespace is kept: indentation can be the fix."""
    if not chat:
        return text.split("\n", 1)[0].rstrip()
    if "```" in text:
        text = text.split("```", 2)[1]
        text = text.split("\n", 1)[1] if "\n" in text else text  # the fence's language tag
    return next((line.rstrip() for line in text.split("\n") if line.strip()), "")
