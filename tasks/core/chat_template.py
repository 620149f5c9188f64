"""The one ChatML chat template, for tokenizers that ship none (tinycoder) and the `chatml` choice.

Dependency-free on purpose: the trainer image (Dockerfile.trainer) imports it without settings
or a database.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
