"""Generated tables live in the docs between ``<!-- name -->`` and ``<!-- /name -->`` markers."""

from __future__ import annotations


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return head + begin + body + end + tail
