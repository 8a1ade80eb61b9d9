"""Who is calling: ragline API keys, JWT bearer tokens, or nobody at all.

A request presents one credential, as ``Authorization: Bearer <credential>``
or as ``X-API-Key: <credential>``, and :class:`Authenticator` sends it where
its form says:

- ``rk_<key id>_<secret>`` is a ragline API key, issued by
  ``ragline keys create`` and checked by the key store
  (:class:`serving.gateway.store.ApiKeyStore`, behind :class:`KeyVerifier`);
- three dot-separated parts are a JWT, checked by :class:`JwtVerifier`
  against a shared secret (HS256/384/512) or the public keys of a JWKS file
  (RS, PS and ES algorithms, the key picked by ``kid``). ``iss``, ``aud`` and
  ``exp`` are required; ``nbf`` is checked when present.

Either way the result is an :class:`Identity`: user, team, roles and the
document labels granted to a key. :class:`serving.gateway.policy.Policy`
turns it into rights. Without identity settings the service runs open and
every caller is :data:`ANONYMOUS` (team ``public``, no roles).

What holds here:

- A credential never reaches a log line, an error message or an
  :class:`Identity`. Key ids do: they are not secret, and they are what an
  administrator needs to find or revoke a key.
- Checking a JWT is CPU work and runs on the event loop: tens of
  microseconds, a few once the verified token is remembered (for
  ``jwt.cache_seconds``, never past its ``exp``). The one blocking step,
  re-reading the JWKS file when a token names a ``kid`` the verifier does
  not know (at most once per ``jwks_refresh_seconds``), runs on a worker
  thread in :meth:`Authenticator.authenticate_async`, as do key store reads
  that its cache cannot answer.
- The algorithm comes from the settings, never from the token: a token whose
  header names an algorithm the settings do not list is refused, ``none`` is
  never listed, and HMAC secrets and public keys are never used for each
  other's algorithms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import jwt
from pydantic import Field, SecretStr, field_validator, model_validator

from ingestion.config import NAME_PATTERN, StrictModel
from ingestion.errors import ConfigError, Unauthenticated

__all__ = [
    "ANONYMOUS",
    "KEY_PREFIX",
    "ApiKeysConfig",
    "AuthMethod",
    "Authenticator",
    "Identity",
    "IdentityConfig",
    "JwtAlgorithm",
    "JwtConfig",
    "JwtVerifier",
    "KeyVerifier",
    "upstream_headers",
]

logger = logging.getLogger(__name__)

AuthMethod = Literal["api_key", "jwt", "anonymous"]

JwtAlgorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
]

KEY_PREFIX = "rk_"

# The key type (JWK ``kty``) each asymmetric algorithm verifies with.
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}

_MISSING_CREDENTIALS = (
    "This service needs credentials: send 'Authorization: Bearer <key>' or "
    "'X-API-Key: <key>', with an API key from `ragline keys create` or a token "
    "from your identity provider."
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request comes from, as the credential it presented proves.

    ``key_id`` names the API key used (None for tokens and anonymous callers);
    ``labels`` are document access labels granted to the key itself, on top
    of what the policy grants the team and roles.
    """

    user: str
    team: str
    roles: frozenset[str] = frozenset()
    key_id: str | None = None
    method: AuthMethod = "api_key"
    labels: frozenset[str] = frozenset()


ANONYMOUS = Identity(user="anonymous", team="public", method="anonymous")


class KeyVerifier(Protocol):
    """What the authenticator needs of an API key store."""

    def authenticate(self, plaintext: str) -> Identity:
        """The identity of a ``rk_`` key; raises ``Unauthenticated``. May block."""
        ...

    async def authenticate_async(self, plaintext: str) -> Identity:
        """The same, without blocking the event loop."""
        ...


# -- settings ---------------------------------------------------------------------


class ApiKeysConfig(StrictModel):
    """API keys from ``ragline keys create``, stored hashed in the catalog database."""

    cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How long a key read from the database is trusted without "
        "reading it again. A key revoked by another process (the CLI, another "
        "replica) stops working within this time; in the revoking process at "
        "once. 0 reads the database on every request.",
    )
    cache_size: int = Field(
        default=10_000,
        ge=1,
        description="Most keys kept in memory; the least recently used go first.",
    )


class JwtConfig(StrictModel):
    """JWT bearer tokens from an identity provider."""

    issuer: str = Field(min_length=1, description="The required 'iss' claim.")
    audience: list[str] = Field(
        min_length=1,
        description="Accepted 'aud' values (one name or a list); a token must "
        "name at least one of them.",
    )
    algorithms: tuple[JwtAlgorithm, ...] = Field(
        default=("RS256",),
        min_length=1,
        description="Signature algorithms accepted; 'none' never is. HS* "
        "verify with 'secret', RS*/PS*/ES* with the keys of 'jwks_file'.",
    )
    secret: SecretStr | None = Field(
        default=None,
        description="Shared secret of the HS* algorithms, at least as many bytes "
        "as the hash (32 for HS256, 64 for HS512); put it in an environment "
        "variable: ${VAR}.",
    )
    jwks_file: Path | None = Field(
        default=None,
        description="A JSON Web Key Set file ({'keys': [...]}) with the public "
        "keys of RS*/PS*/ES* tokens; every key needs a 'kid'.",
    )
    jwks_refresh_seconds: float = Field(
        default=60.0,
        ge=0,
        description="A token naming an unknown 'kid' makes the verifier re-read "
        "the JWKS file, at most this often, so rotated keys are picked up "
        "without a restart.",
    )
    leeway_seconds: float = Field(
        default=30.0,
        ge=0,
        le=300,
        description="Clock skew tolerated when checking 'exp' and 'nbf'.",
    )
    user_claim: str = Field(
        default="sub",
        min_length=1,
        description="Claim naming the user; dots reach into nested claims.",
    )
    team_claim: str = Field(
        default="team",
        min_length=1,
        description="Claim naming the team; dots reach into nested claims.",
    )
    roles_claim: str = Field(
        default="roles",
        min_length=1,
        description="Claim with the roles, a list or a space-separated string "
        "(e.g. 'realm_access.roles' for Keycloak); missing means no roles.",
    )
    cache_seconds: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="How long a verified token is remembered, so the same "
        "token is not verified again on every request (never past its 'exp'). "
        "A key removed from the JWKS file stops working within this time. "
        "0 verifies every time.",
    )
    cache_size: int = Field(
        default=10_000,
        ge=1,
        description="Most verified tokens remembered; the least recent go first.",
    )
    default_team: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="Team of tokens without a team claim; unset refuses them.",
    )

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _keys_fit_algorithms(self) -> JwtConfig:
        hmac_algorithms = [a for a in self.algorithms if a.startswith("HS")]
        public_algorithms = [a for a in self.algorithms if not a.startswith("HS")]
        if hmac_algorithms and self.secret is None:
            raise ValueError(
                f"algorithms {hmac_algorithms} need 'secret'; set it, or drop them"
            )
        if self.secret is not None and not hmac_algorithms:
            raise ValueError(
                "'secret' is set but no HS* algorithm is listed; list HS256 (or "
                "HS384, HS512), or remove the secret"
            )
        if public_algorithms and self.jwks_file is None:
            raise ValueError(
                f"algorithms {public_algorithms} need 'jwks_file' with the "
                "issuer's public keys"
            )
        if self.jwks_file is not None and not public_algorithms:
            raise ValueError(
                "'jwks_file' is set but no RS*, PS* or ES* algorithm is listed"
            )
        if self.secret is not None:
            _check_secret_length(self.secret, hmac_algorithms)
        return self


def _check_secret_length(secret: SecretStr, algorithms: Sequence[str]) -> None:
    # RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
    needed = max(int(a[2:]) // 8 for a in algorithms)
    have = len(secret.get_secret_value().encode())
    if have < needed:
        raise ValueError(
            f"'secret' has {have} bytes; {max(algorithms)} needs at least {needed}. "
            "Generate one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(64))'"
        )


class IdentityConfig(StrictModel):
    """How callers prove who they are. Unset runs the service open (anonymous)."""

    api_keys: ApiKeysConfig | None = Field(
        default_factory=ApiKeysConfig,
        description="API keys from `ragline keys create`; null refuses them.",
    )
    jwt: JwtConfig | None = Field(
        default=None, description="JWT bearer tokens; unset refuses them."
    )

    @model_validator(mode="after")
    def _some_method(self) -> IdentityConfig:
        if self.api_keys is None and self.jwt is None:
            raise ValueError(
                "both 'api_keys' and 'jwt' are off, so nobody could call the "
                "service; enable one, or remove the identity section to run open"
            )
        return self


# -- JWT --------------------------------------------------------------------------


class JwtVerifier:
    """Checks JWT bearer tokens and maps their claims to an :class:`Identity`.

    >>> verifier = JwtVerifier(JwtConfig(issuer="https://id.example.com",
    ...     audience="ragline", algorithms=["HS256"], secret="x" * 32))
    >>> verifier.verify(token)  # doctest: +SKIP
    Identity(user='alice', team='search', roles=frozenset({'analyst'}), ...)
    """

    def __init__(
        self,
        config: JwtConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._monotonic = monotonic
        self._wall = wall
        self._allowed = frozenset(config.algorithms)
        self._secret = (
            config.secret.get_secret_value().encode() if config.secret else None
        )
        self._decoder = jwt.PyJWT(
            options={
                "require": ["exp", "iss", "aud"],
                "enforce_minimum_key_length": True,
            }
        )
        self._reload_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at = -math.inf
        self._verified_tokens: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        if config.jwks_file is not None:
            self.reload()

    def reload(self) -> None:
        """Read the JWKS file again (blocking); a broken file keeps the old keys."""
        path = self._config.jwks_file
        if path is None:
            return
        with self._reload_lock:
            self._loaded_at = self._monotonic()
            keys = read_jwks(path) if not self._keys else _read_or_keep(path)
            if keys is None:
                return
            self._keys = keys
        with self._cache_lock:
            self._verified_tokens.clear()  # a removed key stops working at once
        logger.debug("jwks loaded: file=%s keys=%d", path, len(self._keys))

    def verify(self, token: str) -> Identity:
        """The identity a token proves; raises ``Unauthenticated``.

        May re-read the JWKS file; from async code use :meth:`verify_async`.
        """
        identity = self._remembered(token)
        if identity is not None:
            return identity
        header, algorithm = self._checked_header(token)
        if self._reload_due(header, algorithm):
            self.reload()
        return self._verified(token, header, algorithm)

    async def verify_async(self, token: str) -> Identity:
        """Like :meth:`verify`, re-reading the JWKS file on a worker thread."""
        identity = self._remembered(token)
        if identity is not None:
            return identity
        header, algorithm = self._checked_header(token)
        if self._reload_due(header, algorithm):
            await asyncio.to_thread(self.reload)
        return self._verified(token, header, algorithm)

    # -- steps ----------------------------------------------------------------

    def _checked_header(self, token: str) -> tuple[dict[str, Any], str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise Unauthenticated(
                "The bearer token is not a well-formed JWT (its header cannot be "
                "read); send the token exactly as your identity provider issued it."
            ) from err
        algorithm = header.get("alg")
        if not algorithm or not isinstance(algorithm, str):
            raise Unauthenticated(
                "The bearer token is not a well-formed JWT: its header names no "
                "signing algorithm ('alg')."
            )
        if algorithm not in self._allowed:
            accepted = ", ".join(sorted(self._allowed))
            raise Unauthenticated(
                f"The token is signed with algorithm {_shown(algorithm)}, which "
                f"this service does not accept; it accepts {accepted}."
            )
        return header, algorithm

    def _reload_due(self, header: dict[str, Any], algorithm: str) -> bool:
        kid = header.get("kid")
        if algorithm.startswith("HS") or not isinstance(kid, str) or kid in self._keys:
            return False
        refresh = self._config.jwks_refresh_seconds
        return self._monotonic() - self._loaded_at >= refresh

    def _verified(self, token: str, header: dict[str, Any], algorithm: str) -> Identity:
        key = self._key_for(header, algorithm)
        claims = self._decode(token, key, algorithm)
        identity = self._identity(claims)
        self._remember(token, identity, float(claims["exp"]))
        return identity

    def _remembered(self, token: str) -> Identity | None:
        with self._cache_lock:
            entry = self._verified_tokens.get(token)
            if entry is None:
                return None
            identity, good_until = entry
            if self._wall() >= good_until:
                del self._verified_tokens[token]
                return None
            self._verified_tokens.move_to_end(token)
            return identity

    def _remember(self, token: str, identity: Identity, expires: float) -> None:
        config = self._config
        if config.cache_seconds <= 0:
            return
        good_until = min(
            expires + config.leeway_seconds, self._wall() + config.cache_seconds
        )
        with self._cache_lock:
            self._verified_tokens[token] = (identity, good_until)
            while len(self._verified_tokens) > config.cache_size:
                self._verified_tokens.popitem(last=False)

    def _key_for(self, header: dict[str, Any], algorithm: str) -> Any:
        if algorithm.startswith("HS"):
            return self._secret
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated(
                "The token has no 'kid' header, so no key can be chosen to check "
                "it; ask your identity provider to name the signing key."
            )
        jwk = self._keys.get(kid)
        if jwk is None:
            raise Unauthenticated(
                f"The token was signed by key {_shown(kid)}, which this service "
                "does not trust; ask an administrator to add the key to the JWKS "
                "file."
            )
        wanted = _KEY_TYPES[algorithm[:2]]
        if jwk.key_type != wanted:
            raise Unauthenticated(
                f"Key {kid!r} is an {jwk.key_type} key and cannot check a token "
                f"signed with {algorithm}; the token or the JWKS file is wrong."
            )
        return jwk.key

    def _decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        config = self._config
        try:
            return self._decoder.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
            )
        except jwt.PyJWTError as err:
            raise Unauthenticated(self._explain(err)) from err

    def _explain(self, err: jwt.PyJWTError) -> str:
        config = self._config
        if isinstance(err, jwt.ExpiredSignatureError):
            return "The token has expired; get a new one from your identity provider."
        if isinstance(err, jwt.ImmatureSignatureError):
            return (
                "The token is not valid yet (its 'nbf' is in the future); check the "
                "clocks of the identity provider and of this service."
            )
        if isinstance(err, jwt.InvalidAudienceError):
            return (
                "The token is not meant for this service: its audience ('aud') must "
                f"include {' or '.join(repr(a) for a in config.audience)}."
            )
        if isinstance(err, jwt.InvalidIssuerError):
            return (
                "The token comes from an issuer this service does not trust; it "
                f"accepts tokens issued by {config.issuer!r}."
            )
        if isinstance(err, jwt.MissingRequiredClaimError):
            return f"The token lacks the required {err.claim!r} claim."
        if isinstance(err, jwt.InvalidSignatureError):
            return (
                "The token's signature does not verify: it was altered, or signed "
                "with a key this service does not trust."
            )
        if isinstance(err, jwt.InvalidKeyError):
            return (
                "The token cannot be checked with the configured key (too short or "
                "of the wrong type); ask an administrator to fix the JWT settings."
            )
        if isinstance(err, jwt.DecodeError):
            return (
                "The bearer token is not a well-formed JWT; send the token exactly "
                "as your identity provider issued it."
            )
        return f"The token is not valid: {err}."

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        config = self._config
        user = _claim(claims, config.user_claim)
        if not isinstance(user, str) or not user.strip():
            raise Unauthenticated(
                f"The token has no {config.user_claim!r} claim naming the user."
            )
        team = _claim(claims, config.team_claim)
        if team is None:
            team = config.default_team
        if not isinstance(team, str) or not team:
            raise Unauthenticated(
                f"The token has no {config.team_claim!r} claim naming a team; ask "
                "your identity provider to add it."
            )
        roles = _roles(_claim(claims, config.roles_claim), config.roles_claim)
        return Identity(user=user, team=team, roles=roles, method="jwt")


def read_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS file by ``kid``; raises ``ConfigError`` naming the fault."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(
            f"Cannot read the JWKS file {path}: {err}. It must be JSON of the form "
            '{"keys": [...]} with the public keys of the token issuer.'
        ) from err
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"The JWKS file {path} has no 'keys' list; write it as "
            '{"keys": [{"kty": ..., "kid": ..., ...}]}.'
        )
    return dict(_jwk(path, i, entry) for i, entry in enumerate(entries))


def _jwk(path: Path, index: int, entry: Any) -> tuple[str, jwt.PyJWK]:
    where = f"{path}: keys[{index}]"
    if not isinstance(entry, dict) or not entry.get("kid"):
        raise ConfigError(
            f"{where} has no 'kid'; every key needs one, tokens name their key by it."
        )
    if "d" in entry or entry.get("kty") == "oct":
        raise ConfigError(
            f"{where} (kid {entry['kid']!r}) holds secret key material; a JWKS "
            "file for this service must hold public keys only."
        )
    try:
        return str(entry["kid"]), jwt.PyJWK(entry)
    except jwt.PyJWTError as err:
        raise ConfigError(
            f"{where} (kid {entry['kid']!r}) is not a usable key: {err}"
        ) from err


def _read_or_keep(path: Path) -> dict[str, jwt.PyJWK] | None:
    """A reload that fails keeps the keys already loaded, and says why."""
    try:
        return read_jwks(path)
    except ConfigError as err:
        logger.warning("jwks reload failed, keeping the loaded keys: error=%s", err)
        return None


def _shown(value: str, limit: int = 64) -> str:
    """A value from a token, quoted and cut short, for a message."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _roles(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(r, str) for r in value):
        return frozenset(value)
    raise Unauthenticated(
        f"The token's {claim!r} claim must be a list of role names or a "
        "space-separated string."
    )


# -- the authenticator ------------------------------------------------------------


class Authenticator:
    """Turns request headers into an :class:`Identity`.

    ``key_store`` checks ``rk_`` API keys and is required when
    ``config.api_keys`` is set; the JWT verifier is built from ``config.jwt``
    unless one is passed. With ``config=None`` the service is open and every
    caller is :data:`ANONYMOUS`.
    """

    def __init__(
        self,
        config: IdentityConfig | None,
        *,
        key_store: KeyVerifier | None = None,
        jwt_verifier: JwtVerifier | None = None,
    ) -> None:
        self._config = config
        self._keys: KeyVerifier | None = None
        self._jwt: JwtVerifier | None = None
        if config is None:
            return
        if config.api_keys is not None:
            if key_store is None:
                raise ConfigError(
                    "API keys are enabled in the identity settings but no key "
                    "store was given; open an ApiKeyStore on the catalog database."
                )
            self._keys = key_store
        if config.jwt is not None:
            self._jwt = jwt_verifier or JwtVerifier(config.jwt)

    @property
    def is_open(self) -> bool:
        """Whether the service runs without identity: every caller is anonymous."""
        return self._config is None

    def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """Who sent these headers; raises ``Unauthenticated``. May block on I/O."""
        if self._config is None:
            return ANONYMOUS
        credential = presented_credential(headers)
        if credential.startswith(KEY_PREFIX):
            return self._key_store().authenticate(credential)
        return self._jwt_verifier(credential).verify(credential)

    async def authenticate_async(self, headers: Mapping[str, str]) -> Identity:
        """Like :meth:`authenticate`; any blocking read runs on a worker thread."""
        if self._config is None:
            return ANONYMOUS
        credential = presented_credential(headers)
        if credential.startswith(KEY_PREFIX):
            return await self._key_store().authenticate_async(credential)
        return await self._jwt_verifier(credential).verify_async(credential)

    def _key_store(self) -> KeyVerifier:
        if self._keys is None:
            raise Unauthenticated(
                "This service does not accept API keys; send a bearer token from "
                "your identity provider."
            )
        return self._keys

    def _jwt_verifier(self, credential: str) -> JwtVerifier:
        if credential.count(".") != 2:
            raise Unauthenticated(
                "The credential is neither a ragline API key (rk_<id>_<secret>) "
                "nor a JWT (three dot-separated parts); send the whole key or token."
            )
        if self._jwt is None:
            raise Unauthenticated(
                "This service does not accept JWT bearer tokens; send an API key "
                "from `ragline keys create`."
            )
        return self._jwt


def presented_credential(headers: Mapping[str, str]) -> str:
    """The credential of a request: a bearer token, else the ``X-API-Key`` header."""
    authorization = _header(headers, "authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if scheme.lower() != "bearer":
            raise Unauthenticated(
                f"The Authorization scheme {scheme!r} is not supported; send "
                "'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            )
    key = _header(headers, "x-api-key")
    if key and key.strip():
        return key.strip()
    raise Unauthenticated(_MISSING_CREDENTIALS)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Starlette's headers ignore case; a plain mapping may spell names any way.
    value = headers.get(name)
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def upstream_headers(identity: Identity) -> dict[str, str]:
    """Headers that tell an upstream who the caller is.

    Values are percent-encoded where they are not printable ASCII, so a user
    name from a token can never break a header. A proxy must drop any
    ``X-Ragline-*`` header the client sent before adding these.
    """
    return {
        "X-Ragline-User": _header_value(identity.user),
        "X-Ragline-Team": _header_value(identity.team),
        "X-Ragline-Roles": ",".join(_header_value(r) for r in sorted(identity.roles)),
    }


def _header_value(value: str) -> str:
    return quote(value, safe=" !#$&'()*+-./:;<=>?@[]^_`{|}~")
