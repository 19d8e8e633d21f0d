"""The reconciler's per-version plan: OVMS's ModelManagerVersionsReload table (research ovms.md §3.4), every row."""

from __future__ import annotations

import pytest

from engine.reconciler import plan_versions
from engine.status import ErrorCode, State, VersionStatus

A, S, L, U, E = State.AVAILABLE, State.START, State.LOADING, State.UNLOADING, State.END


def statuses(**states: State) -> dict[int, VersionStatus]:
    return {int(k[1:]): VersionStatus(int(k[1:]), s) for k, s in states.items()}


ROWS = [
    # (current, requested, start, reload, retire)
    (statuses(v1=A), {2}, {2}, set(), {1}),
    (statuses(v2=A, v3=A, v1=U), {2, 3}, set(), set(), set()),
    (statuses(v1=A, v2=A), {1, 2, 3}, {3}, set(), set()),
    (statuses(v2=A, v3=A, v1=E), {2, 3, 4}, {4}, set(), set()),
    ({}, {1, 2}, {1, 2}, set(), set()),
    (statuses(v1=A, v2=A, v3=A), {2, 3}, set(), set(), {1}),
    (statuses(v2=A, v1=E), {1, 2}, set(), {1}, set()),
    (statuses(v2=A, v1=E), {1, 3}, {3}, {1}, {2}),
    (statuses(v1=S), {1}, set(), set(), set()),
    (statuses(v1=L), {1}, set(), set(), set()),
    (statuses(v1=U), set(), set(), set(), set()),
    (statuses(v1=L), set(), set(), set(), {1}),
    (statuses(v1=S), set(), set(), set(), {1}),
    (statuses(v1=U), {1}, set(), {1}, set()),
]


@pytest.mark.parametrize(("current", "requested", "start", "reload", "retire"), ROWS)
def test_ovms_version_table(current, requested, start, reload, retire) -> None:  # type: ignore[no-untyped-def]
    plan = plan_versions(current, requested)
    assert (set(plan.start), set(plan.reload), set(plan.retire)) == (start, reload, retire)


def test_failed_version_is_reloaded_when_requested() -> None:
    current = {1: VersionStatus(1, State.LOADING, ErrorCode.UNKNOWN, "boom")}
    assert set(plan_versions(current, {1}).reload) == {1}


def test_stale_config_reloads_only_available_requested_versions() -> None:
    current = statuses(v1=A, v2=A, v3=E)
    plan = plan_versions(current, {2, 3}, stale={1, 2, 3})
    assert set(plan.reload) == {2, 3}  # 3 because it ended, 2 because its config changed
    assert set(plan.retire) == {1}


def test_policy_change_alone_starts_and_retires_without_reloading() -> None:
    plan = plan_versions(statuses(v3=A), {1, 2, 3})
    assert (set(plan.start), set(plan.reload), set(plan.retire)) == ({1, 2}, set(), set())
