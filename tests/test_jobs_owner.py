"""A job belongs to the API key that created it: the /jobs edge, in process, with the real
job manager (embedded store, one job worker) and the real route table. The principal of each
request is put on the ASGI scope where the authentication edge puts it (serving.auth)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from models.predictor import load_predictor
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES
from serving.auth import PRINCIPAL_KEY, Principal
from serving.edge import RouteTable, dispatch
from serving.engine import Engine
from serving.jobs.manager import JobManager
from serving.jobs.routes import JobRoutes
from serving.settings import Settings

PRINCIPALS = {
    "alice": Principal("alice", frozenset({"jobs"})),
    "bob": Principal("bob", frozenset({"jobs", "predict"})),
    "root": Principal("root", frozenset({"admin"})),
}
CSV = (",".join(FEATURE_NAMES) + "\n" + ",".join(str(EXAMPLE_CUSTOMER[n]) for n in FEATURE_NAMES) + "\n").encode()


@pytest.fixture(scope="module")
def engine(trained):
    return Engine(load_predictor(trained.model), Settings())


def run_with_jobs(engine, scenario):
    """Run `scenario(client)` against /jobs; the X-Test-Principal header picks the principal
    (absent: authentication off, principal None)."""

    async def main():
        manager = JobManager(engine, Settings(job_workers=1))
        table = RouteTable()
        table.mount("/jobs", JobRoutes(manager, 1 << 20))

        async def not_found(scope, receive, send):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def app(scope, receive, send):
            who = dict(scope["headers"]).get(b"x-test-principal")
            scope[PRINCIPAL_KEY] = PRINCIPALS[who.decode()] if who else None
            await dispatch(not_found, table, scope, receive, send)

        await manager.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://jobs") as client:
                return await scenario(client)
        finally:
            await manager.stop()

    return asyncio.run(main())


def as_(who: str | None) -> dict[str, str]:
    return {"x-test-principal": who} if who else {}


async def submit(client, who: str | None) -> str:
    r = await client.post("/jobs", files={"file": ("c.csv", CSV, "text/csv")}, headers=as_(who))
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


async def finished(client, job_id: str, who: str | None) -> dict:
    for _ in range(200):
        r = await client.get(f"/jobs/{job_id}", headers=as_(who))
        if r.json()["status"] == "completed":
            return r.json()
        await asyncio.sleep(0.05)
    raise AssertionError(r.text)


def test_another_keys_job_is_answered_exactly_as_an_unknown_one(engine):
    async def scenario(client):
        job_id = await submit(client, "alice")
        await finished(client, job_id, "alice")
        unknown = "Z" * 22
        for method, path in (("GET", ""), ("GET", "/result"), ("GET", "/result?format=csv"), ("DELETE", "")):
            theirs = await client.request(method, f"/jobs/{job_id}{path}", headers=as_("bob"))
            nobodys = await client.request(method, f"/jobs/{unknown}{path}", headers=as_("bob"))
            assert theirs.status_code == nobodys.status_code == 404
            assert theirs.json() == {"error": f"no job {job_id!r} (unknown, or its result expired)"}
            assert nobodys.json() == {"error": f"no job {unknown!r} (unknown, or its result expired)"}
        # bob's DELETE changed nothing; alice still has her result
        assert (await client.get(f"/jobs/{job_id}/result", headers=as_("alice"))).status_code == 200

    run_with_jobs(engine, scenario)


def test_the_owner_and_an_admin_key_may_use_a_job(engine):
    async def scenario(client):
        job_id = await submit(client, "alice")
        status = await finished(client, job_id, "alice")
        assert "owner" not in status, "the owner is not shown (it is the key's name, known to the caller)"
        assert (await client.get(f"/jobs/{job_id}/result", headers=as_("root"))).status_code == 200
        erased = await client.delete(f"/jobs/{job_id}", headers=as_("root"))
        assert erased.status_code == 200 and erased.json()["erased"] is True
        assert (await client.get(f"/jobs/{job_id}", headers=as_("alice"))).status_code == 404

    run_with_jobs(engine, scenario)


def test_without_authentication_the_job_id_is_the_only_secret(engine):
    async def scenario(client):
        anonymous = await submit(client, None)
        owned = await submit(client, "alice")
        await finished(client, anonymous, None)
        await finished(client, owned, "alice")
        # auth off (no principal): any job by its id
        assert (await client.get(f"/jobs/{owned}")).status_code == 200
        # a job made while auth was off belongs to no key: only an admin key sees it once keys are on
        assert (await client.get(f"/jobs/{anonymous}", headers=as_("alice"))).status_code == 404
        assert (await client.get(f"/jobs/{anonymous}", headers=as_("root"))).status_code == 200

    run_with_jobs(engine, scenario)
