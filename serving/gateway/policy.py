"""What a caller may do: collections, virtual models, document labels, admin rights.

The policy settings name each team, what it may use, and roles within the
team that add to it::

    teams:
      search:
        collections: [handbook]
        models: [chat]
        labels: [staff]
        roles:
          analyst: {collections: "*", labels: [finance]}
          operator: {admin: true}
      public:
        collections: [handbook]
        models: [chat]

What holds here:

- A caller's rights are the union of its team's rights, the rights of each
  of its roles that the team defines, and the labels of its API key. Roles
  the team does not define grant nothing (a token may carry roles of other
  systems).
- ``"*"`` grants every collection, every model, or every document.
- A team the policy does not name is denied everything, with a message that
  says so. Anonymous callers (an open service) are team ``public``.
- Without a policy every caller may use every collection and model and sees
  the documents its key's labels allow; nobody has admin rights.
- Each check returns a :class:`Decision` for the audit log; a denial raises
  :class:`PolicyDenied` (an ``AccessDenied``, HTTP 403) that carries it.
- Checks are set lookups on rights compiled at start-up; no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ingestion.config import NAME_PATTERN, StrictModel
from ingestion.errors import AccessDenied, ConfigError, RequestError
from retrieval.filters import AccessScope

from .identity import Identity

if TYPE_CHECKING:
    from ..service import Caller

__all__ = [
    "Check",
    "Decision",
    "Grant",
    "Policy",
    "PolicyConfig",
    "PolicyDenied",
    "Rights",
    "RoleRules",
    "TeamRules",
]

Check = Literal["team", "collection", "model", "admin", "ingest"]

Grant = list[str] | Literal["*"]

_NAME = re.compile(NAME_PATTERN)
_SCOPE_CACHE_SIZE = 4096
_SHOWN = 10  # names listed in a denial before "and N more"


# -- settings ---------------------------------------------------------------------


class RoleRules(StrictModel):
    """What a role adds to its team's rights."""

    collections: Grant = Field(
        default_factory=list, description="Collections it may use, or '*' for all."
    )
    models: Grant = Field(
        default_factory=list,
        description="Virtual models it may call, or '*' for all.",
    )
    labels: Grant = Field(
        default_factory=list,
        description="Document access labels it holds, or '*' to see every "
        "document. Public documents (no labels) are always visible.",
    )
    admin: bool = Field(
        default=False, description="Whether it may use the admin operations."
    )
    ingest: Grant = Field(
        default_factory=list,
        description="Streaming sources it may push change events to "
        "(POST /ingest/{source}), or '*' for all.",
    )

    @field_validator("collections", "models", "labels", "ingest", mode="before")
    @classmethod
    def _grant(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "*":
                raise ValueError(
                    f"write a list of names, or '*' for all; not the string {value!r}"
                )
            return value
        if isinstance(value, list | tuple):
            if "*" in value and len(value) > 1:
                raise ValueError("'*' stands alone; write '*' instead of a list")
            if any(not isinstance(v, str) or not v.strip() for v in value):
                raise ValueError("every entry must be a non-empty name")
            return "*" if list(value) == ["*"] else list(value)
        return value


class TeamRules(RoleRules):
    """A team's rights, and the roles within it."""

    roles: dict[str, RoleRules] = Field(
        default_factory=dict,
        description="Roles of the team by name; each adds its rights to the team's.",
    )


class PolicyConfig(StrictModel):
    """Who may use which collections and models, by team and role."""

    teams: dict[str, TeamRules] = Field(
        min_length=1, description="Teams by name; a team not listed may use nothing."
    )

    @model_validator(mode="after")
    def _consistent_names(self) -> PolicyConfig:
        _check_names(self.teams, "teams", "team")
        for team, rules in self.teams.items():
            _check_names(rules.roles, f"teams.{team}.roles", "role")
        return self

    @classmethod
    def parse(cls, raw: Any, *, origin: str = "policy") -> PolicyConfig:
        """Validate a loaded mapping; raises ``ConfigError`` naming each fault."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in (origin, *e['loc']))}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise ConfigError(f"{problems}.") from err

    def check_references(
        self,
        *,
        collections: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        teams: Iterable[str] = (),
    ) -> None:
        """Raise ``ConfigError`` when the policy names a collection or model that
        does not exist, or when a team used elsewhere (say a JWT default team)
        is not in the policy. ``None`` skips that check."""
        problems: list[str] = []
        for where, rules in self._all_rules():
            problems += _unknown(f"{where}.collections", rules.collections, collections)
            problems += _unknown(f"{where}.models", rules.models, models)
        problems += [
            f"team {t!r} is used in the settings but not declared under teams"
            for t in teams
            if t not in self.teams
        ]
        if problems:
            raise ConfigError(
                "The policy does not fit the settings: " + "; ".join(problems) + "."
            )

    def _all_rules(self) -> Iterable[tuple[str, RoleRules]]:
        for team, rules in self.teams.items():
            yield f"teams.{team}", rules
            for role, role_rules in rules.roles.items():
                yield f"teams.{team}.roles.{role}", role_rules


def _check_names(names: Iterable[str], where: str, kind: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"{where}: {name!r} is not a valid {kind} name; use 1 to 64 letters, "
                "digits, '_', '.' or '-', starting with a letter or digit"
            )
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ValueError(
                f"{where}: {other!r} and {name!r} differ only in case; names are "
                f"compared exactly, so rename one to avoid granting the wrong {kind}"
            )


def _unknown(where: str, grant: Grant, known: Iterable[str] | None) -> list[str]:
    if known is None or grant == "*":
        return []
    names = set(known)
    listed = ", ".join(sorted(names)) or "none"
    return [
        f"{where}: {name!r} does not exist (known: {listed})"
        for name in grant
        if name not in names
    ]


# -- decisions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """One policy check, for the audit log: what was asked, by whom, and the answer."""

    check: Check
    target: str
    allowed: bool
    reason: str
    user: str
    team: str
    key_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "target": self.target,
            "allowed": self.allowed,
            "reason": self.reason,
            "user": self.user,
            "team": self.team,
            "key_id": self.key_id,
        }


class PolicyDenied(AccessDenied):
    """The policy does not allow what the caller asked for (HTTP 403).

    ``decision`` is the record of the check, for the audit log.
    """

    def __init__(self, message: str, decision: Decision) -> None:
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True, slots=True)
class Rights:
    """What a caller may do; ``None`` means everything of that kind."""

    collections: frozenset[str] | None
    models: frozenset[str] | None
    labels: frozenset[str] | None
    admin: bool
    ingest: frozenset[str] | None = frozenset()

    @classmethod
    def of(cls, rules: RoleRules) -> Rights:
        return cls(
            collections=_names(rules.collections),
            models=_names(rules.models),
            labels=_names(rules.labels),
            admin=rules.admin,
            ingest=_names(rules.ingest),
        )

    def __or__(self, other: Rights) -> Rights:
        return Rights(
            collections=_union(self.collections, other.collections),
            models=_union(self.models, other.models),
            labels=_union(self.labels, other.labels),
            admin=self.admin or other.admin,
            ingest=_union(self.ingest, other.ingest),
        )

    def may_ingest(self, source: str) -> bool:
        return self.ingest is None or source in self.ingest

    def may_use_collection(self, name: str) -> bool:
        return self.collections is None or name in self.collections

    def may_use_model(self, name: str) -> bool:
        return self.models is None or name in self.models


def _names(grant: Grant) -> frozenset[str] | None:
    return None if grant == "*" else frozenset(grant)


def _union(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    return None if a is None or b is None else a | b


@dataclass(frozen=True, slots=True)
class _Grantor:
    """Rights and who grants them: a team, or a role within it."""

    source: str
    rights: Rights


@dataclass(frozen=True, slots=True)
class _Team:
    name: str
    grantor: _Grantor
    roles: Mapping[str, _Grantor]

    @classmethod
    def compile(cls, name: str, rules: TeamRules) -> _Team:
        roles = {
            role: _Grantor(f"role {role!r} of team {name!r}", Rights.of(role_rules))
            for role, role_rules in rules.roles.items()
        }
        return cls(name, _Grantor(f"team {name!r}", Rights.of(rules)), roles)

    def grantors(self, roles: frozenset[str]) -> list[_Grantor]:
        """The team first, then its roles the caller holds, by name."""
        held = [self.roles[r] for r in sorted(roles) if r in self.roles]
        return [self.grantor, *held]

    def known_roles(self, roles: frozenset[str]) -> frozenset[str]:
        return roles.intersection(self.roles)


# -- the policy -------------------------------------------------------------------


class Policy:
    """Answers whether an :class:`Identity` may use a collection, a model, or admin.

    ``collections`` and ``models``, when given, are the names that exist; a
    policy that names others raises ``ConfigError``.

    >>> policy = Policy(PolicyConfig.parse({"teams": {"search": {"models": "*"}}}))
    >>> policy.check_model(Identity(user="alice", team="search"), "chat").allowed
    True
    """

    def __init__(
        self,
        config: PolicyConfig | None,
        *,
        collections: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
    ) -> None:
        if config is not None:
            config.check_references(collections=collections, models=models)
        self._config = config
        self._teams = {
            name: _Team.compile(name, rules)
            for name, rules in (config.teams.items() if config else ())
        }
        self._rights: dict[tuple[str, frozenset[str]], Rights] = {}
        self._scopes: dict[tuple[Rights, frozenset[str]], AccessScope] = {}

    @property
    def is_open(self) -> bool:
        """Whether no policy is configured: every collection and model is open."""
        return self._config is None

    def rights(self, identity: Identity) -> Rights | None:
        """The caller's rights; ``None`` when its team is not in the policy."""
        if self._config is None:
            return Rights(
                None, None, frozenset(identity.labels), admin=False, ingest=None
            )
        team = self._teams.get(identity.team)
        if team is None:
            return None
        key = (team.name, team.known_roles(identity.roles))
        rights = self._rights.get(key)
        if rights is None:
            rights = self._rights[key] = _combined(team.grantors(key[1]))
        return rights

    # -- checks -----------------------------------------------------------------

    def decide_collection(self, identity: Identity, name: str) -> Decision:
        """Whether the caller may use a collection, without raising."""
        return self._decide(
            identity, "collection", name, lambda r: r.may_use_collection(name)
        )

    def decide_model(self, identity: Identity, name: str) -> Decision:
        """Whether the caller may call a virtual model, without raising."""
        return self._decide(identity, "model", name, lambda r: r.may_use_model(name))

    def decide_admin(self, identity: Identity) -> Decision:
        """Whether the caller may use admin operations, without raising."""
        return self._decide(identity, "admin", "admin", lambda r: r.admin)

    def decide_ingest(self, identity: Identity, source: str) -> Decision:
        """Whether the caller may push change events to a streaming source."""
        return self._decide(identity, "ingest", source, lambda r: r.may_ingest(source))

    def check_ingest(self, identity: Identity, source: str) -> Decision:
        """Allow pushes to a streaming source or raise :class:`PolicyDenied`."""
        return self._enforce(identity, self.decide_ingest(identity, source))

    def check_collection(self, identity: Identity, name: str) -> Decision:
        """Allow a collection or raise :class:`PolicyDenied`."""
        return self._enforce(identity, self.decide_collection(identity, name))

    def check_model(self, identity: Identity, name: str) -> Decision:
        """Allow a virtual model or raise :class:`PolicyDenied`."""
        return self._enforce(identity, self.decide_model(identity, name))

    def check_admin(self, identity: Identity) -> Decision:
        """Allow admin operations or raise :class:`PolicyDenied`."""
        return self._enforce(identity, self.decide_admin(identity))

    def caller(self, identity: Identity) -> Caller:
        """The caller ``/ask`` and ``/search`` serve: user, document scope, collections.

        Raises :class:`PolicyDenied` when the team is not in the policy.
        """
        rights = self.rights(identity)
        if rights is None:
            decision = self._unknown_team(identity, "team", identity.team)
            raise PolicyDenied(self._denial(identity, decision), decision)
        return _caller_class()(
            user=identity.user,
            scope=self._scope(identity, rights),
            collections=rights.collections,
        )

    def check_grant(self, team: str, roles: Iterable[str] = ()) -> None:
        """Refuse to issue a key for a team or role the policy does not define.

        Raises ``RequestError``; without a policy every name is accepted.
        """
        if self._config is None:
            return
        compiled = self._teams.get(team)
        if compiled is None:
            raise RequestError(
                f"Team {team!r} is not in the policy, so its key could use nothing; "
                f"pick one of {_listed(self._teams)}, or declare the team first."
            )
        unknown = sorted(set(roles) - compiled.roles.keys())
        if unknown:
            raise RequestError(
                f"Team {team!r} defines no role {', '.join(map(repr, unknown))}; its "
                f"roles are {_listed(compiled.roles)}."
            )

    # -- internals --------------------------------------------------------------

    def _decide(
        self,
        identity: Identity,
        check: Check,
        target: str,
        allows: Callable[[Rights], bool],
    ) -> Decision:
        if self._config is None:
            allowed = check != "admin"
            reason = (
                "no policy is configured: every collection, model and source is open"
                if allowed
                else "no policy is configured, so nobody has admin rights"
            )
            return _decision(identity, check, target, allowed, reason)
        team = self._teams.get(identity.team)
        if team is None:
            return self._unknown_team(identity, check, target)
        for grantor in team.grantors(identity.roles):
            if allows(grantor.rights):
                return _decision(
                    identity, check, target, True, f"{grantor.source} allows it"
                )
        held = ", ".join(repr(r) for r in sorted(team.known_roles(identity.roles)))
        through = f" nor its roles {held}" if held else ""
        reason = f"neither team {team.name!r}{through} allows it"
        return _decision(identity, check, target, False, reason)

    def _unknown_team(self, identity: Identity, check: Check, target: str) -> Decision:
        reason = f"team {identity.team!r} is not in the policy"
        return _decision(identity, check, target, False, reason)

    def _enforce(self, identity: Identity, decision: Decision) -> Decision:
        if not decision.allowed:
            raise PolicyDenied(self._denial(identity, decision), decision)
        return decision

    def _denial(self, identity: Identity, decision: Decision) -> str:
        team, user = identity.team, identity.user
        if self._config is None:
            return (
                "No policy is configured, so nobody has admin rights; declare a "
                "policy with 'admin: true' on a team or role to allow them."
            )
        if team not in self._teams:
            return (
                f"Team {team!r} is not in the policy, so {user!r} may use nothing "
                "here; ask an administrator to add the team to the policy, or use "
                "a key or token of a team it names."
            )
        if decision.check == "admin":
            return (
                f"{user!r} of team {team!r} has no admin rights; an administrator "
                "grants them with 'admin: true' on the team or one of its roles in "
                "the policy."
            )
        if decision.check == "ingest":
            return (
                f"Team {team!r} may not push events to the source "
                f"{decision.target!r}: {decision.reason}. Ask an administrator to "
                f"add it to teams.{team}.ingest in the policy, or to one of the "
                "team's roles; the team may push to: "
                f"{_listed(self._granted(identity, 'ingest'))}."
            )
        noun = "collection" if decision.check == "collection" else "model"
        return (
            f"Team {team!r} may not use the {noun} {decision.target!r}: "
            f"{decision.reason}. Ask an administrator to add it to "
            f"teams.{team}.{noun}s in the policy, or to one of the team's roles; "
            f"the team may use: {_listed(self._granted(identity, noun))}."
        )

    def _granted(self, identity: Identity, noun: str) -> Iterable[str]:
        rights = self.rights(identity)
        if rights is None:
            return ()
        names = {
            "collection": rights.collections,
            "model": rights.models,
            "ingest": rights.ingest,
        }[noun]
        return names or ()

    def _scope(self, identity: Identity, rights: Rights) -> AccessScope:
        if rights.labels is None:
            return AccessScope.everything()
        key = (rights, identity.labels)
        scope = self._scopes.get(key)
        if scope is None:
            if len(self._scopes) >= _SCOPE_CACHE_SIZE:
                self._scopes.clear()
            scope = self._scopes[key] = AccessScope.of(rights.labels | identity.labels)
        return scope


@functools.cache
def _caller_class() -> type[Caller]:
    # Imported on first use, not at the top: serving.service imports the
    # gateway package, which may import this module.
    from ..service import Caller

    return Caller


def _combined(grantors: list[_Grantor]) -> Rights:
    rights = grantors[0].rights
    for grantor in grantors[1:]:
        rights = rights | grantor.rights
    return rights


def _decision(
    identity: Identity, check: Check, target: str, allowed: bool, reason: str
) -> Decision:
    return Decision(
        check=check,
        target=target,
        allowed=allowed,
        reason=reason,
        user=identity.user,
        team=identity.team,
        key_id=identity.key_id,
    )


def _listed(names: Iterable[str]) -> str:
    ordered = sorted(names)
    if not ordered:
        return "none"
    shown = ", ".join(ordered[:_SHOWN])
    more = len(ordered) - _SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
