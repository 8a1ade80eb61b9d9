"""The connector protocol and the registry that maps a ``type`` to a connector.

A connector is one small class: a pydantic settings model for its keys in
``ragline.yaml`` and a ``documents`` method that lists the source::

    class NotesConfig(SourceConfig):
        folder: Path

    @register_connector("notes", NotesConfig)
    class NotesSource:
        def __init__(self, config: NotesConfig) -> None:
            self.config = config

        def documents(self, known: Mapping[str, str | None]) -> Iterator[Listing]:
            for path in sorted(self.config.folder.glob("*.txt")):
                yield SourceDocument(
                    source=self.config.name, key=path.name, uri=path.as_uri(),
                    content=path.read_bytes(), media_type="text/plain",
                )

A connector that is not registered can be named in the settings file by its
import path, ``type: mypackage.notes:NotesSource``; it then declares its
settings model as the class attribute ``config_model``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, TypeVar, runtime_checkable

from ..config import SourceConfig
from ..errors import ConfigError
from ..models import Listing

__all__ = [
    "Source",
    "connector_for",
    "register_connector",
    "registered_types",
]


@runtime_checkable
class Source(Protocol):
    """A source of documents.

    ``documents`` lists every document the source holds now. ``known`` maps the
    key of each document the catalog holds to the ``version`` validator it was
    indexed with, so the connector may answer ``UnchangedDocument`` without
    reading content. A connector that cannot list the whole source raises
    ``SourceError``; one that cannot read a single document yields a
    ``FailedDocument`` and goes on.
    """

    config: SourceConfig

    def documents(self, known: Mapping[str, str | None]) -> Iterator[Listing]: ...


SourceFactory = Callable[[SourceConfig], Source]
_T = TypeVar("_T")

_REGISTRY: dict[str, tuple[type[SourceConfig], SourceFactory]] = {}


def register_connector(
    type_name: str, config_model: type[SourceConfig]
) -> Callable[[_T], _T]:
    """Class decorator: make ``type: <type_name>`` in the settings file use this class."""

    def decorate(cls: _T) -> _T:
        _REGISTRY[type_name] = (config_model, cls)  # type: ignore[assignment]
        return cls

    return decorate


def registered_types() -> list[str]:
    _load_builtin_connectors()
    return sorted(_REGISTRY)


def connector_for(type_name: str) -> tuple[type[SourceConfig], SourceFactory]:
    """The settings model and factory for a source ``type``.

    ``type`` is a registered name (``files``, ``web``, ``sql``) or an import
    path ``package.module:Class`` whose class has a ``config_model`` attribute.
    """
    _load_builtin_connectors()
    if type_name in _REGISTRY:
        return _REGISTRY[type_name]
    if ":" in type_name:
        return _import_connector(type_name)
    raise ConfigError(
        f"Unknown source type {type_name!r}. Use one of {', '.join(sorted(_REGISTRY))}, "
        "or an import path such as 'mypackage.notes:NotesSource'."
    )


def _import_connector(path: str) -> tuple[type[SourceConfig], SourceFactory]:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"Source type {path!r} could not be imported ({err}). Check that the "
            "module is installed and the class name is right."
        ) from err
    config_model = getattr(cls, "config_model", None)
    if not (isinstance(config_model, type) and issubclass(config_model, SourceConfig)):
        raise ConfigError(
            f"Connector {path!r} must declare 'config_model', a subclass of "
            "ingestion.SourceConfig, for its settings."
        )
    return config_model, cls


def _load_builtin_connectors() -> None:
    # Importing the modules runs their @register_connector decorators.
    from ..streaming import nats_jetstream, redis_streams  # noqa: F401
    from . import files, sql, web  # noqa: F401
