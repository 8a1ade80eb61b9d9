"""The settings file model: one YAML file, composed of each package's own models.

Loading reads the file, replaces ``${VAR}`` and ``${VAR:-default}`` with
environment variables (secrets stay out of the file), validates every key,
and resolves relative paths against the folder that holds the file. Errors
name the key at fault and the form it expects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from eval.config import EvalConfig
from flows.config import FlowsConfig
from index.config import CatalogConfig, CollectionConfig
from ingestion.config import ChunkingConfig, EmbedderConfig, SourceConfig, StrictModel
from ingestion.connectors.base import connector_for
from ingestion.errors import ConfigError, NotFound
from retrieval.config import RetrievalConfig
from serving.config import ServeConfig
from serving.gateway.config import GatewayConfig, LlamaCppTargetConfig

__all__ = [
    "CONFIG_ENV",
    "IngestConfig",
    "LoggingConfig",
    "Settings",
    "load_settings",
]

CONFIG_ENV = "RAGLINE_CONFIG"

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")


class IngestConfig(StrictModel):
    batch_chunks: int = Field(
        default=1024, ge=1, description="Chunks embedded and committed together."
    )


class Settings(StrictModel):
    """Everything ``ragline.yaml`` holds."""

    data_dir: Path = Field(default=Path(".ragline"))
    catalog: CatalogConfig = CatalogConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    chunking: ChunkingConfig = ChunkingConfig()
    ingest: IngestConfig = IngestConfig()
    logging: LoggingConfig = LoggingConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    serve: ServeConfig = ServeConfig()
    gateway: GatewayConfig = GatewayConfig()
    collections: tuple[CollectionConfig, ...] = Field(min_length=1)
    sources: tuple[SourceConfig, ...] = ()
    flows: FlowsConfig = FlowsConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [c.name for c in self.collections]
        _require_unique(names, "collections")
        _require_unique([s.name for s in self.sources], "sources")
        for i, source in enumerate(self.sources):
            if source.collection not in names:
                raise ValueError(
                    f"sources[{i}].collection: {source.collection!r} is not a collection; "
                    f"declare it under 'collections' (known: {', '.join(names)})"
                )
        return self

    def collection(self, name: str) -> CollectionConfig:
        for collection in self.collections:
            if collection.name == name:
                return collection
        raise NotFound(
            f"No collection named {name!r}; the settings declare "
            f"{', '.join(c.name for c in self.collections)}."
        )

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        raise NotFound(
            f"No source named {name!r}; the settings declare "
            f"{', '.join(s.name for s in self.sources) or 'none'}."
        )

    def sources_of(self, collection: str) -> list[SourceConfig]:
        return [s for s in self.sources if s.collection == collection]

    def embedder_for(self, collection: CollectionConfig) -> EmbedderConfig:
        return collection.embedder or self.embedder

    def chunking_for(self, collection: CollectionConfig) -> ChunkingConfig:
        return collection.chunking or self.chunking

    def catalog_url(self) -> str:
        if self.catalog.url is not None:
            return self.catalog.url.get_secret_value()
        return f"sqlite:///{self.data_dir / 'catalog.db'}"


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read, interpolate and validate a settings file."""
    file = Path(path)
    raw = _read_yaml(file)
    raw = _interpolate(raw, "")
    return parse_settings(raw, base_dir=file.resolve().parent, origin=str(file))


def parse_settings(raw: Any, *, base_dir: Path, origin: str = "settings") -> Settings:
    """Validate an already loaded mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin}: the top level must be a mapping of keys such as "
            "'collections' and 'sources'."
        )
    sources = [
        _parse_source(entry, i, base_dir, origin)
        for i, entry in enumerate(raw.get("sources") or [])
    ]
    try:
        settings = Settings.model_validate({**raw, "sources": sources})
    except ValidationError as err:
        raise ConfigError(_format_errors(origin, err, Settings)) from err
    data_dir = (
        settings.data_dir
        if settings.data_dir.is_absolute()
        else base_dir / settings.data_dir
    )
    return _resolve_model_paths(
        settings.model_copy(update={"data_dir": data_dir}), base_dir
    )


def _resolve_model_paths(settings: Settings, base_dir: Path) -> Settings:
    """Make the model files named in the settings absolute, like ``data_dir``."""

    def resolved(path: Path) -> Path:
        return path if path.is_absolute() else base_dir / path

    retrieval, serve = settings.retrieval, settings.serve
    if retrieval.rerank is not None:
        rerank = retrieval.rerank.model_copy(
            update={"model_path": resolved(retrieval.rerank.model_path)}
        )
        retrieval = retrieval.model_copy(update={"rerank": rerank})
    if serve.generator.model_path is not None:
        generator = serve.generator.model_copy(
            update={"model_path": resolved(serve.generator.model_path)}
        )
        serve = serve.model_copy(update={"generator": generator})
    gateway = settings.gateway
    providers = tuple(
        p.model_copy(update={"model_path": resolved(p.model_path)})
        if isinstance(p, LlamaCppTargetConfig) and p.model_path is not None
        else p
        for p in gateway.providers
    )
    identity = gateway.identity
    if identity is not None and identity.jwt is not None and identity.jwt.jwks_file:
        jwt = identity.jwt.model_copy(
            update={"jwks_file": resolved(identity.jwt.jwks_file)}
        )
        identity = identity.model_copy(update={"jwt": jwt})
    gateway = gateway.model_copy(update={"providers": providers, "identity": identity})
    return settings.model_copy(
        update={"retrieval": retrieval, "serve": serve, "gateway": gateway}
    )


def _read_yaml(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(
            f"No settings file at {file}. Pass --config FILE or set {CONFIG_ENV}; "
            "examples/ragline.yaml is a starting point."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Cannot read the settings file {file}: {err}") from err
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{file} is not valid YAML{where}: {problem}.") from err


def _interpolate(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return _ENV_PATTERN.sub(lambda m: _env_value(m, where), value)
    return value


def _env_value(match: re.Match[str], where: str) -> str:
    name, default = match.group(1), match.group(2)
    value = os.environ.get(name)
    if value is not None:
        return value
    if default is not None:
        return default
    raise ConfigError(
        f"{where}: environment variable {name} is not set. Set it, or write "
        f"${{{name}:-default}} to give a default."
    )


def _parse_source(entry: Any, i: int, base_dir: Path, origin: str) -> SourceConfig:
    where = f"sources[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{origin}: {where} must be a mapping with at least name, type and collection."
        )
    type_name = entry.get("type")
    if not isinstance(type_name, str):
        raise ConfigError(
            f"{origin}: {where}.type is missing; name the connector (files, web, sql, "
            "or an import path package.module:Class)."
        )
    model, _factory = connector_for(type_name)
    try:
        config = model.model_validate(entry)
    except ValidationError as err:
        raise ConfigError(_format_errors(origin, err, model, prefix=where)) from err
    return _resolve_paths(config, base_dir)


def _resolve_paths(config: SourceConfig, base_dir: Path) -> SourceConfig:
    updates = {
        name: base_dir / value
        for name, value in config
        if isinstance(value, Path) and not value.is_absolute()
    }
    return config.model_copy(update=updates) if updates else config


def _format_errors(
    origin: str, err: ValidationError, model: type[Any], prefix: str = ""
) -> str:
    lines = [f"{origin} has {err.error_count()} invalid setting(s):"]
    for error in err.errors():
        key = _key_path(prefix, error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_allowed_keys(model, error['loc'])}")
        else:
            lines.append(f"  {key}: {error['msg']}")
    return "\n".join(lines)


def _key_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _allowed_keys(model: type[Any], loc: tuple[Any, ...]) -> str:
    """The keys that are allowed where an unknown one was found, for the message."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return ""
        current = _model_of(field.annotation)
        if current is None:
            return ""
    fields = getattr(current, "model_fields", None)
    if not fields:
        return ""
    names = sorted(f.alias or name for name, f in fields.items())
    return f"; expected one of: {', '.join(names)}"


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _require_unique(names: list[str], what: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"{what}: names must be unique; repeated: {', '.join(duplicates)}"
        )
