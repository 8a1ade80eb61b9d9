"""Loading and validating the settings file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestion.errors import ConfigError
from ragline.settings import load_settings

MINIMAL = """
data_dir: ./.ragline
collections:
  - name: docs
    index: faiss
sources:
  - name: handbook
    type: files
    collection: docs
    path: ./handbook
    include: ["**/*.md", "**/*.html"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ragline.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_minimal_form_loads(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, MINIMAL))

    assert settings.data_dir == tmp_path / ".ragline", (
        "data_dir resolves against the file"
    )
    [source] = settings.sources
    assert source.type == "files"
    assert source.path == tmp_path / "handbook"  # type: ignore[attr-defined]
    assert settings.catalog_url() == f"sqlite:///{tmp_path / '.ragline' / 'catalog.db'}"


def test_the_example_settings_file_loads() -> None:
    examples = Path(__file__).resolve().parents[1] / "examples"
    settings = load_settings(examples / "ragline.yaml")
    assert [c.name for c in settings.collections] == ["docs"]


def test_an_unknown_key_is_named_with_the_keys_allowed_there(tmp_path: Path) -> None:
    text = MINIMAL.replace("    index: faiss", "    index: faiss\n    indx: qdrant")
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    message = str(info.value)
    assert "collections[0].indx: unknown key" in message, message
    assert "expected one of:" in message and "index" in message, message


def test_an_unknown_key_in_a_source_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    path: ./handbook", "    path: ./handbook\n    inclde: ['*']"
    )
    with pytest.raises(ConfigError, match=r"sources\[0\]\.inclde: unknown key"):
        load_settings(_write(tmp_path, text))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_settings(_write(tmp_path, "collections:\n  - name: docs\n   bad: [\n"))


def test_a_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RAGLINE_CONFIG"):
        load_settings(tmp_path / "absent.yaml")


def test_environment_variables_are_interpolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CATALOG_PASSWORD", "s3cret")
    text = MINIMAL + (
        "catalog:\n  url: postgresql+psycopg://app:${CATALOG_PASSWORD}@db/${DB_NAME:-rag}\n"
    )
    settings = load_settings(_write(tmp_path, text))
    assert settings.catalog_url() == "postgresql+psycopg://app:s3cret@db/rag"
    assert "s3cret" not in repr(settings.catalog), "secrets must not show in reprs"


def test_a_missing_environment_variable_names_the_key(tmp_path: Path) -> None:
    text = MINIMAL + "catalog:\n  url: ${RAGLINE_TEST_UNSET_VARIABLE}\n"
    with pytest.raises(
        ConfigError, match=r"catalog\.url: environment variable RAGLINE_TEST_UNSET"
    ):
        load_settings(_write(tmp_path, text))


def test_a_source_must_name_a_declared_collection(tmp_path: Path) -> None:
    text = MINIMAL.replace("    collection: docs", "    collection: dcos")
    with pytest.raises(ConfigError, match=r"'dcos' is not a collection"):
        load_settings(_write(tmp_path, text))


def test_an_unknown_source_type_lists_the_known_ones(tmp_path: Path) -> None:
    text = MINIMAL.replace("type: files", "type: filez")
    with pytest.raises(
        ConfigError,
        match=r"Unknown source type 'filez'\. Use one of files, nats, redis_stream, sql, web",
    ):
        load_settings(_write(tmp_path, text))


def test_a_wrong_value_type_is_explained(tmp_path: Path) -> None:
    text = MINIMAL + "chunking:\n  max_tokens: lots\n"
    with pytest.raises(
        ConfigError, match=r"chunking\.max_tokens: Input should be a valid integer"
    ):
        load_settings(_write(tmp_path, text))


def test_overlap_must_be_smaller_than_chunk_size(tmp_path: Path) -> None:
    text = MINIMAL + "chunking:\n  max_tokens: 64\n  overlap_tokens: 64\n"
    with pytest.raises(ConfigError, match="overlap_tokens"):
        load_settings(_write(tmp_path, text))


def test_no_collections_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="collections"):
        load_settings(_write(tmp_path, "sources: []\n"))


def test_the_readme_gateway_example_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("```yaml\ngateway:") + len("```yaml\n")
    example = readme[start : readme.index("```", start)]
    (tmp_path / "ragline.yaml").write_text(
        "collections: [{name: docs}]\n" + example, encoding="utf-8"
    )
    monkeypatch.setenv("VLLM_KEY", "a-key-from-the-environment")

    settings = load_settings(tmp_path / "ragline.yaml")

    gateway = settings.gateway
    assert [p.name for p in gateway.providers] == ["local", "vllm-a"]
    assert gateway.routing is not None and gateway.ask_model == "chat"
    assert gateway.identity is not None and gateway.identity.jwt is not None
    assert gateway.identity.jwt.jwks_file == tmp_path / "jwks.json"
