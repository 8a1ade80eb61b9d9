"""The policy: unions of team and role rights, wildcards, denials, settings checks."""

from __future__ import annotations

from typing import Any

import pytest

from ingestion.errors import AccessDenied, ConfigError, RequestError
from retrieval.filters import AccessScope
from serving.gateway.identity import ANONYMOUS, Identity
from serving.gateway.policy import Decision, Policy, PolicyConfig, PolicyDenied
from serving.service import Caller

SETTINGS: dict[str, Any] = {
    "teams": {
        "search": {
            "collections": ["handbook"],
            "models": ["chat"],
            "labels": ["staff"],
            "roles": {
                "analyst": {"collections": ["finance"], "labels": ["finance"]},
                "operator": {"admin": True},
                "researcher": {"models": "*"},
            },
        },
        "support": {
            "collections": ["tickets"],
            "models": ["chat", "judge"],
            "roles": {"lead": {"collections": "*", "labels": "*"}},
        },
        "public": {"collections": ["handbook"], "models": ["chat"]},
    }
}


@pytest.fixture
def policy() -> Policy:
    return Policy(PolicyConfig.parse(SETTINGS))


def who(team: str = "search", *roles: str, labels: tuple[str, ...] = ()) -> Identity:
    return Identity(
        user="alice",
        team=team,
        roles=frozenset(roles),
        key_id="0123456789ab",
        labels=frozenset(labels),
    )


def denial(check: Any, *arguments: Any) -> PolicyDenied:
    with pytest.raises(PolicyDenied) as caught:
        check(*arguments)
    assert isinstance(caught.value, AccessDenied), "a denial is a 403"
    return caught.value


def test_a_team_may_use_what_it_is_granted(policy: Policy) -> None:
    decision = policy.check_collection(who(), "handbook")

    assert decision == Decision(
        check="collection",
        target="handbook",
        allowed=True,
        reason="team 'search' allows it",
        user="alice",
        team="search",
        key_id="0123456789ab",
    )
    assert policy.check_model(who(), "chat").allowed


def test_roles_add_to_the_team_and_the_decision_names_the_grantor(
    policy: Policy,
) -> None:
    analyst = who("search", "analyst")

    decision = policy.check_collection(analyst, "finance")

    assert decision.reason == "role 'analyst' of team 'search' allows it"
    assert policy.check_collection(analyst, "handbook").allowed, "team rights stay"
    assert not policy.decide_collection(who(), "finance").allowed


def test_rights_are_the_union_of_team_roles_and_key_labels(policy: Policy) -> None:
    caller = policy.caller(who("search", "analyst", "researcher", labels=("hr",)))

    assert caller == Caller(
        user="alice",
        scope=AccessScope.of({"staff", "finance", "hr"}),
        collections=frozenset({"handbook", "finance"}),
    )
    assert policy.check_model(who("search", "researcher"), "anything").allowed


def test_roles_the_team_does_not_define_grant_nothing(policy: Policy) -> None:
    outsider_role = who("search", "lead")  # a role of another team

    assert not policy.decide_collection(outsider_role, "tickets").allowed
    assert policy.caller(outsider_role) == policy.caller(who("search"))


def test_wildcards_grant_every_collection_model_and_document(policy: Policy) -> None:
    lead = who("support", "lead")

    caller = policy.caller(lead)

    assert caller.collections is None and caller.may_use("anything")
    assert caller.scope == AccessScope.everything()
    assert policy.check_collection(lead, "whatever").allowed
    assert not policy.decide_model(lead, "embedder").allowed, "models stay listed"


def test_a_denied_collection_names_team_target_and_remedy(policy: Policy) -> None:
    denied = denial(policy.check_collection, who("search", "analyst"), "tickets")

    message = str(denied)
    assert "Team 'search' may not use the collection 'tickets'" in message
    assert "teams.search.collections" in message, "says where to grant it"
    assert "finance, handbook" in message, "says what the team may use"
    assert denied.decision.allowed is False
    assert denied.decision.reason == (
        "neither team 'search' nor its roles 'analyst' allows it"
    )


def test_a_denied_model_names_team_target_and_remedy(policy: Policy) -> None:
    denied = denial(policy.check_model, who("public"), "judge")

    assert "Team 'public' may not use the model 'judge'" in str(denied)
    assert "teams.public.models" in str(denied)
    assert denied.decision.check == "model" and denied.decision.target == "judge"


def test_admin_rights_come_from_a_team_or_role_only(policy: Policy) -> None:
    assert policy.check_admin(who("search", "operator")).allowed

    denied = denial(policy.check_admin, who("search", "analyst"))

    assert "'alice' of team 'search' has no admin rights" in str(denied)
    assert "admin: true" in str(denied)


def test_decide_answers_without_raising(policy: Policy) -> None:
    decisions = [
        policy.decide_collection(who(), "tickets"),
        policy.decide_model(who(), "judge"),
        policy.decide_admin(who()),
    ]

    assert [d.allowed for d in decisions] == [False, False, False]
    assert decisions[0].to_json() == {
        "check": "collection",
        "target": "tickets",
        "allowed": False,
        "reason": "neither team 'search' allows it",
        "user": "alice",
        "team": "search",
        "key_id": "0123456789ab",
    }


def test_an_unknown_team_is_denied_everything_and_told_why(policy: Policy) -> None:
    stranger = who("marketing", "operator")

    for check, arguments in [
        (policy.check_collection, (stranger, "handbook")),
        (policy.check_model, (stranger, "chat")),
        (policy.check_admin, (stranger,)),
        (policy.caller, (stranger,)),
    ]:
        denied = denial(check, *arguments)
        assert "Team 'marketing' is not in the policy" in str(denied), str(denied)
        assert denied.decision.reason == "team 'marketing' is not in the policy"


def test_anonymous_callers_get_the_public_team(policy: Policy) -> None:
    assert policy.caller(ANONYMOUS) == Caller(
        user="anonymous", scope=AccessScope(), collections=frozenset({"handbook"})
    )
    assert not policy.decide_model(ANONYMOUS, "judge").allowed


def test_without_a_policy_everything_is_open_but_admin() -> None:
    policy = Policy(None)
    caller = who("anyone", labels=("finance",))

    assert policy.is_open
    assert policy.check_collection(caller, "anything").allowed
    assert policy.check_model(caller, "anything").allowed
    assert policy.caller(caller) == Caller(
        user="alice", scope=AccessScope.of({"finance"}), collections=None
    )
    assert "No policy is configured" in str(denial(policy.check_admin, caller))


def test_check_grant_refuses_teams_and_roles_the_policy_lacks(
    policy: Policy,
) -> None:
    policy.check_grant("search", ["analyst", "operator"])

    with pytest.raises(RequestError, match="Team 'marketing' is not in the policy"):
        policy.check_grant("marketing")
    with pytest.raises(RequestError, match="defines no role 'lead'"):
        policy.check_grant("search", ["analyst", "lead"])
    Policy(None).check_grant("anything", ["at-all"])


@pytest.mark.parametrize(
    ("settings", "fault"),
    [
        ({"teams": {}}, "teams"),
        ({"teams": {"bad name": {}}}, "'bad name' is not a valid team name"),
        ({"teams": {"Search": {}, "search": {}}}, "differ only in case"),
        (
            {"teams": {"search": {"roles": {"Lead": {}, "lead": {}}}}},
            "teams.search.roles: 'Lead' and 'lead' differ only in case",
        ),
        (
            {"teams": {"search": {"roles": {"no/slash": {}}}}},
            "'no/slash' is not a valid role name",
        ),
        ({"teams": {"search": {"collections": "docs"}}}, "a list of names, or '\\*'"),
        ({"teams": {"search": {"models": ["*", "chat"]}}}, "'\\*' stands alone"),
        ({"teams": {"search": {"labels": [""]}}}, "non-empty name"),
        ({"teams": {"search": {"colections": ["docs"]}}}, "colections"),
        ({"teams": {"search": {"roles": {"a": {"roles": {}}}}}}, "roles.a.roles"),
    ],
)
def test_inconsistent_settings_are_config_errors_naming_the_fault(
    settings: dict[str, Any], fault: str
) -> None:
    with pytest.raises(ConfigError, match=fault):
        PolicyConfig.parse(settings)


def test_a_policy_naming_missing_collections_or_models_is_refused() -> None:
    config = PolicyConfig.parse(SETTINGS)

    with pytest.raises(ConfigError) as caught:
        Policy(config, collections=["handbook", "tickets"], models=["chat"])

    message = str(caught.value)
    assert "teams.search.roles.analyst.collections: 'finance' does not exist" in message
    assert "teams.support.models: 'judge' does not exist" in message
    assert "known: handbook, tickets" in message
    Policy(config, collections=["handbook", "tickets", "finance"])  # models unchecked


def test_teams_used_elsewhere_must_be_declared() -> None:
    config = PolicyConfig.parse(SETTINGS)

    with pytest.raises(ConfigError, match="team 'partners' is used"):
        config.check_references(teams=["search", "partners"])
