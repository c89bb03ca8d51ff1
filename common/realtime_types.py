"""The openai SDK's Realtime event types as explicit `type -> model` tables, per protocol and direction.

Shared by the simulator (to judge what clients send) and the gateway (to check commands before they
go to the API). Nothing is resolved from a string beyond a lookup in this table.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import ValidationError

Protocol = Literal["ga", "beta"]
_client_models: dict[str, dict[str, type]] = {}
_server_models: dict[str, dict[str, type]] = {}


class ClientEventError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code


def type_table(union: Any) -> dict[str, type]:
    """`Annotated[Union[...], ...]` of SDK event models -> {their `type` literal: model}."""
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


def client_event_models(protocol: Protocol) -> dict[str, type]:
    if protocol not in _client_models:
        if protocol == "ga":
            from openai.types.realtime import RealtimeClientEvent
        else:
            from openai.types.beta.realtime import RealtimeClientEvent
        _client_models[protocol] = type_table(RealtimeClientEvent)
    return _client_models[protocol]


def server_event_models(protocol: Protocol) -> dict[str, type]:
    if protocol not in _server_models:
        if protocol == "ga":
            from openai.types.realtime import RealtimeServerEvent
        else:
            from openai.types.beta.realtime import RealtimeServerEvent
        _server_models[protocol] = type_table(RealtimeServerEvent)
    return _server_models[protocol]


def build_validators(protocol: Protocol) -> int:
    """Build every event model's pydantic validator now; returns how many were built.

    The SDK defers each model's build to its first validation (DEFER_PYDANTIC_BUILD): a gateway would
    build them one by one as a conversation's events first arrive, each in its own process's memory
    (~4 MB for the lot) and each stalling its event for a moment. Built before the zygote forks, every
    stage set shares one copy; built in a stage's start, no event waits for one.
    """
    built = 0
    for model in (*client_event_models(protocol).values(), *server_event_models(protocol).values()):
        if not model.__pydantic_complete__:  # type: ignore[attr-defined]
            model.model_rebuild()  # type: ignore[attr-defined]
            built += 1
    return built


def validate_client_event(event: dict[str, Any], protocol: Protocol) -> None:
    """Raise ClientEventError (message, param) if the SDK's model for this event type rejects it."""
    model = client_event_models(protocol).get(event.get("type"))
    if model is None:
        raise ClientEventError(f"Invalid value: '{event.get('type')}'.", "type")
    try:
        model.model_validate(event)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
        if first["type"] == "missing":
            raise ClientEventError(f"Missing required parameter: '{where}'.", where, "missing_required_parameter") from exc
        raise ClientEventError(f"Invalid '{where}': {first['msg']}", where) from exc
