"""A workflow's input as the caller sent it (any SDK, any language): the
request, or why it is not one. One decoder for `RLMRun` and `RLMSession`."""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import RawValue

from workflows.request import Request, not_json_problem, parse_request, without_unknown_fields


def decode_request(raw: RawValue, model: type[Request]) -> tuple[Request | str, str | None]:
    """The request or why it is invalid (every invalid field with its
    message); and, for a request valid but for fields no model knows, the
    request without them and those fields' refusal (runs started before
    unknown fields were refused replay with them dropped)."""
    what = model.__name__
    try:
        value = workflow.payload_converter().from_payload(raw.payload)
    except Exception as exc:  # any encoding a JSON caller could not mean
        return not_json_problem(what, exc), None
    request = parse_request(value, model)
    if isinstance(request, str) and (dropped := without_unknown_fields(model, value)) is not None:
        return dropped[0], f"invalid {what}: {dropped[1]}"  # type: ignore[return-value]
    return request, None
