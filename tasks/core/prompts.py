"""The shared prompt environment: one Jinja2 setup for every template under include/prompts/.

Taggers (`tasks.tag.taggers`) and the rubric judge (`tasks.judge.stage`) render their prompts
here so that both read templates alike: strict undefined variables, trimmed blocks, no
autoescaping, one cached `Environment` per prompts root. A prompt is one named block of a
template, rendered and stripped (`render_block` by file name, `render_template` for an already
compiled template). Long messages are cut to `MAX_MESSAGE_CHARS` with `TRUNCATION_MARK`
(`clip_text`) so that one pasted document cannot blow the context window; the limit is part of
the taggers' version hashes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tasks.core.paths import PROMPTS_DIR

# Long messages are cut in prompts so that one pasted document cannot blow the context window.
MAX_MESSAGE_CHARS = 2000
TRUNCATION_MARK = " [...]"


@functools.lru_cache(maxsize=4)
def jinja_env(root: str):  # -> jinja2.Environment
    """The Jinja2 environment for templates under `root` (cached per root)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        autoescape=False,
    )


def render_block(template_name: str, block: str, context: dict[str, Any],
                 root: Path | str = PROMPTS_DIR) -> str:
    """Render one block of a template (stripped) — how prompts become message contents."""
    template = jinja_env(str(root)).get_template(template_name)
    return render_template(template, block, context, template_name)


def render_template(template: Any, block: str, context: dict[str, Any], name: str) -> str:
    """Render one block of a compiled template (stripped); `name` is for the error message."""
    if block not in template.blocks:
        raise KeyError(f"template {name} has no block {block!r}; it has {sorted(template.blocks)}")
    return "".join(template.blocks[block](template.new_context(context))).strip()


def clip_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters, the cut marked with TRUNCATION_MARK."""
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK
