"""The ``/state`` document as one shared model: what the replica server sends is what
the gateway's poller parses (every field, in order), parsing is lenient for rolling
upgrades (unknown keys kept, missing keys defaulted, only ``state`` required), and
a malformed report takes the replica out of rotation with the bad field named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmfleet.fleet.replica_status import (
    LIFECYCLE_STATES,
    ReplicaStatusReport,
    describe_errors,
)
from lmfleet.server.lifecycle import ReplicaState
from tests.gateway.fakes import fleet
from tests.gateway.test_registry import A, ready_state, registry
from tests.server.conftest import serving


def test_lifecycle_states_are_the_servers():
    assert tuple(s.value for s in ReplicaState) == LIFECYCLE_STATES


def test_a_real_replica_sends_every_field_in_order_and_the_model_reads_it_back():
    async def main():
        async with serving(Path("sim:llama-50m-cpu"), served_model_names=("sim",)) as (client, _):
            r = await client.get("/state")
            assert r.status_code == 200
            return r.json()

    data = asyncio.run(main())
    assert list(data) == list(ReplicaStatusReport.model_fields)
    report = ReplicaStatusReport.model_validate(data)
    assert (report.state, report.ready, report.model) == ("ready", True, "sim")
    assert report.kv_blocks_total > 0 and report.kv_blocks_free == report.kv_blocks_total
    assert report.model_dump(mode="json") == data


def test_parsing_keeps_unknown_keys_and_defaults_missing_ones():
    report = ReplicaStatusReport.model_validate({"state": "draining", "gpu_temp_c": 61})
    assert report.state == "draining" and report.ready is True and report.running == 0
    assert report.model_extra == {"gpu_temp_c": 61}
    assert report.limits.max_num_seqs is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "state: Field required"),
        ({"state": "sleeping"}, "state: Input should be 'starting', 'ready', 'draining', 'asleep'"),
        ({"state": "ready", "running": -1}, "running: Input should be greater than or equal to 0"),
        ({"state": "ready", "kv_cache_usage": "lots"}, "kv_cache_usage: Input should be a valid "
                                                       "number, unable to parse string as a number "
                                                       "(got 'lots')"),
        ({"state": "ready", "limits": {"max_num_seqs": 0}}, "limits.max_num_seqs: Input should be "
                                                            "greater than or equal to 1 (got 0)"),
    ],
)  # fmt: skip
def test_a_bad_report_names_the_field(doc, message):
    with pytest.raises(ValidationError) as exc:
        ReplicaStatusReport.model_validate(doc)
    assert describe_errors(exc.value).startswith(message)


def test_the_poller_takes_a_malformed_report_out_of_rotation_and_back_when_fixed():
    reg, pool = registry(fleet({"v1": [A]}))
    replica = reg.version("m", "v1").replicas[A]
    pool.states = {A: ready_state()}
    asyncio.run(reg.poll_once())
    assert replica.routable and (replica.running, replica.waiting) == (1, 2)
    pool.states = {A: ready_state(kv_cache_usage="lots")}
    asyncio.run(reg.poll_once())
    assert not replica.routable and replica.state == "unknown"
    assert replica.last_error is not None
    assert replica.last_error.startswith("/state is malformed: kv_cache_usage: Input should be")
    pool.states = {A: ready_state()}
    asyncio.run(reg.poll_once())
    assert replica.routable and replica.state == "ready"
