"""Python functions as tools: the JSON schema comes from the signature through pydantic.

Every public function defined in the module whose parameters all have type hints becomes a tool
(or only those in `__all__`, if it has one); an untyped one is skipped and the reason logged, since
the model would be handed a schema that says nothing about what to pass. Its docstring's first paragraph is the description; arguments are validated by a
pydantic model built from the type hints before the function runs. Sync functions run in a
worker thread so a slow one never blocks the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from common.log import kv
from services.stages.tools.registry import DEFAULT_TIMEOUT_S, Tool

log = logging.getLogger("voicebus.tools")
# resolved path -> (the file's (mtime_ns, size) then, its tools): built before the zygote forks
_preloaded: dict[str, tuple[tuple[int, int], list[Tool]]] = {}


def load_module(spec: str) -> ModuleType:
    """A path to a .py file, or a dotted module name."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ValueError(f"no such tools module: {spec}")
        module_spec = importlib.util.spec_from_file_location(f"voicebus_tools_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot load {spec}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema


def tool_from_function(func: Any, source: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tool:
    hints = typing.get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    model = create_model(f"{func.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    description = inspect.cleandoc(func.__doc__ or func.__name__).split("\n\n", 1)[0].replace("\n", " ")

    async def invoke(arguments: dict[str, Any]) -> Any:
        validated = model.model_validate(arguments)
        kwargs = {name: getattr(validated, name) for name in fields}
        if inspect.iscoroutinefunction(func):
            return await func(**kwargs)
        return await asyncio.to_thread(func, **kwargs)

    return Tool(func.__name__, description, _schema(model), source, invoke, timeout_s)


def untyped_parameters(func: Any) -> list[str]:
    """Parameters without a type hint (*args and **kwargs are not offered to the model anyway)."""
    return [param.name for param in inspect.signature(func).parameters.values()
            if param.annotation is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]


def preload_python_tools(path: Path) -> int:
    """Build a tools file's tools now, in the zygote (the default examples/tools.py): a tools stage it
    forks later for the same file, unchanged, takes them as they are instead of building its own
    (pydantic builds a model and a schema per function: ~3 MB of each stage's private memory).
    Returns how many were built."""
    resolved = path.resolve()
    tools = python_tools(str(resolved))
    _preloaded[str(resolved)] = (_file_key(resolved), tools)
    return len(tools)


def _file_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _preloaded_tools(spec: str, timeout_s: float) -> list[Tool] | None:
    """This file's tools as the zygote built them, if it has not changed since; else None."""
    if not spec.endswith(".py") or not _preloaded:
        return None
    path = Path(spec).resolve()
    built = _preloaded.get(str(path))
    try:
        if built is None or built[0] != _file_key(path):
            return None
    except OSError:
        return None
    return [dataclasses.replace(tool, source=f"python:{spec}", timeout_s=timeout_s) for tool in built[1]]


def python_tools(spec: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Tool]:
    preloaded = _preloaded_tools(spec, timeout_s)
    if preloaded is not None:
        return preloaded
    module = load_module(spec)
    exported = getattr(module, "__all__", None)
    functions = [value for name, value in vars(module).items()
                 if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")
                 and (exported is None or name in exported)]
    typed = []
    for func in functions:
        missing = untyped_parameters(func)
        if missing:
            log.warning(kv("tool_skipped", module=spec, function=func.__name__,
                           reason=repr(f"no type hint on {', '.join(missing)}")))
        else:
            typed.append(func)
    if not typed:
        skipped = f" ({len(functions)} skipped for missing type hints)" if functions else ""
        raise ValueError(f"{spec} defines no public typed functions to offer as tools{skipped}")
    return [tool_from_function(func, f"python:{spec}", timeout_s) for func in typed]
