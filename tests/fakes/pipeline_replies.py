"""One responder for a whole-loop test: generation prompts get generation replies, tagger and
judge prompts get valid tagger/judge JSON. Use as
`FakeOpenAIServer(responder="tests.fakes.pipeline_replies:reply")`."""

from __future__ import annotations

from tests.fakes import generation_replies, tag_responders


def reply(request: dict) -> str:
    if generation_replies.classify(request) != "other":
        return generation_replies.reply(request)
    return tag_responders.tagging_responder(request)
