"""`cvr serve` fuzzed over its own OpenAPI schema (schemathesis 4, in process): no generated request,
valid or not, is answered with a server error (5xx). Every operation of the schema is fuzzed (the
write routes with the API key, over a copy of the demo gallery) with schema-conforming requests,
the two with a JSON body also with requests that break the schema, and searches also with a k that
fits the 5-video gallery (so that they reach the model); a few dozen examples each, derandomized,
so that a run is repeatable and short. Builders: tests/serve_fixture.py.

How the cases reach the app: schemathesis generates them (`APIOperation.as_strategy` under
hypothesis' `@given`, one test per operation and mode) and they are sent through one TestClient
whose lifespan this module holds. schemathesis' own ways do not fit here: its pytest loader for a
schema built in a fixture (`schemathesis.pytest.from_fixture` + `@schema.parametrize()`) sets
`request.node._nodeid`, which pytest 9's nodes no longer have; a schema loaded at import would build
the gallery at collection; and its ASGI transport (`case.call()` on a `from_asgi` schema) runs the
app's lifespan itself, which its pytest plugin then shuts down after every test, so the next test
restarts it (see test_serve.py::test_an_app_whose_lifespan_ran_once_starts_again)."""
from __future__ import annotations

import json

import pytest
import schemathesis
import serve_fixture as sf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

MAX_EXAMPLES = 50
OPERATIONS = [("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/search"), ("GET", "/v1/videos/{video_id}"),
              ("GET", "/v1/videos/{video_id}/thumbnail"), ("GET", "/v1/videos/{video_id}/file"),
              ("GET", "/v1/anchors/{name}.png"), ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/videos"),
              ("DELETE", "/v1/videos/{video_id}")]
# Requests that break the schema need something typed to break: a JSON body. A path parameter is
# any string, so every string a negative case could hold is a positive one (hypothesis: Unsatisfiable).
WITH_BODY = {("POST", "/v1/search"), ("POST", "/v1/videos")}
BASE_URL = "http://testserver"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """(TestClient, schema): the app over a writable copy of the demo world, with the API key."""
    from engine.serve.app import create_app

    world = sf.copy_world(sf.demo_world(tmp_path_factory), str(tmp_path_factory.mktemp("serve-fuzz") / "w"))
    app = create_app(sf.config(world["gallery"], world["anchor_cache"], api_key=sf.API_KEY),
                     sf.retriever(world["gallery"], world["anchor_cache"]))
    with sf.client(app) as client:
        yield client, schemathesis.openapi.from_dict(app.openapi())


def _send(client, case):
    """The case as schemathesis would send it, through the module's TestClient."""
    kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers={"X-API-Key": sf.API_KEY})
    assert not kwargs.get("files"), "no route takes multipart bodies"
    request = {"headers": kwargs.get("headers"), "params": kwargs.get("params") or None}
    if "json" in kwargs:
        request["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        request["content"] = data if isinstance(data, bytes) else str(data).encode()
    return client.request(kwargs["method"], kwargs["url"], **request)


def _fit_k(case):
    """A conforming search whose k fits the 5-video gallery: the schema allows k up to MAX_K (and
    defaults to 10), so most conforming searches stop at the gallery-size check (400) before the
    model; these reach the model with whatever queries, filters and mode were drawn."""
    if isinstance(case.body, dict):
        case.body["k"] = 1 + case.body.get("k", 10) % 5
    return case


def test_every_operation_of_the_schema_is_fuzzed(fuzzed):
    _, schema = fuzzed
    found = {(result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()}
    assert found == set(OPERATIONS)


CASES = ([(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in sorted(WITH_BODY)]
         + [("POST", "/v1/search", "positive-k-fits")])


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_request_is_answered_with_a_server_error(fuzzed, method, path, mode):
    client, schema = fuzzed
    strategy = schema[path][method].as_strategy(GenerationMode.NEGATIVE if mode == "negative" else
                                                GenerationMode.POSITIVE)
    if mode == "positive-k-fits":
        strategy = strategy.map(_fit_k)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = _send(client, case)
        assert response.status_code < 500, (f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                            f"{response.text[:300]}\n{case.as_curl_command()}")

    fuzz()


# Beyond the schema: JSON that Python's json module reads but a schema-driven generator never
# writes (NaN and Infinity, lone UTF-16 surrogates written as \\udXXX escapes), in the places
# the two JSON routes read strings and numbers.
_TEXT = st.text(st.characters(codec=None, categories=("L", "N", "P", "Zs", "Cs", "Cc")), min_size=1, max_size=12)
_NUMBER = st.one_of(st.integers(-3, 8), st.floats(allow_nan=True, allow_infinity=True))
_ANY = st.one_of(_TEXT, _NUMBER, st.none(), st.booleans())
_SEARCH = st.fixed_dictionaries({"queries": st.lists(st.one_of(_TEXT, _ANY), min_size=1, max_size=3)},
                                optional={"k": _NUMBER, "where": st.lists(st.one_of(_TEXT, _ANY), max_size=2),
                                          "mode": st.one_of(st.sampled_from(["auto", "exhaustive"]), _ANY)})
_INDEX = st.fixed_dictionaries({"paths": st.lists(st.one_of(_TEXT, _NUMBER), min_size=1, max_size=2)})


@pytest.mark.parametrize(("route", "bodies"), [("/v1/search", _SEARCH), ("/v1/videos", _INDEX)],
                         ids=["search", "index"])
def test_json_beyond_the_schema_is_never_a_server_error(fuzzed, route, bodies):
    client, _ = fuzzed

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def fuzz(body):
        raw = json.dumps(body, ensure_ascii=True, allow_nan=True)  # lone surrogates as \\udXXX escapes
        response = client.post(route, content=raw.encode(), headers={"Content-Type": "application/json",
                                                                     "X-API-Key": sf.API_KEY})
        assert response.status_code < 500, f"POST {route} {raw[:300]} -> {response.status_code}"

    fuzz()
