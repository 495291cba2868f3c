"""Fuzz `slm serve`'s HTTP API from its own OpenAPI schema (schemathesis): over a thousand generated requests,
valid and invalid, with and without the key. None may be answered 5xx, and every error must be in OpenAI's shape.
"""

import collections

import pytest
from conftest import live_server, tiny_model_dir

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from test_serve import KEY, MODEL, TEXT  # noqa: E402

from slmkit.lm import load_lm  # noqa: E402
from slmkit.serve.app import create_app  # noqa: E402
from slmkit.serve.engine import Engine  # noqa: E402
from slmkit.tokenizer import train_tokenizer  # noqa: E402

REQUESTS = 1200
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx_and_errors_are_openai_shaped(tmp_path):
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    lm = load_lm(str(tiny_model_dir(tmp_path / "m", tok, train_on=TEXT, max_seq_len=64, steps=30)))
    engine = Engine(lm, max_batch=8, max_queue=64)
    app = create_app(engine, MODEL, api_key=KEY, max_body_bytes=100_000, request_timeout_s=60)
    schema = schemathesis.openapi.from_dict(app.openapi())
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen, failures = collections.Counter(), []
    try:
        with live_server(app) as url:
            @settings(max_examples=REQUESTS, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=cases, with_key=st.booleans() | st.just(True))
            def fuzz(case, with_key):
                headers = {"Authorization": f"Bearer {KEY}"} if with_key else {}
                response = case.call(base_url=url, headers=headers, timeout=60)
                seen[(case.method, case.path, response.status_code // 100)] += 1
                problem = None
                if response.status_code >= 500:
                    problem = "a server error"
                elif response.status_code >= 400:
                    try:
                        body = response.json()
                        if set(body) != {"error"} or set(body["error"]) != ERROR_FIELDS \
                                or not body["error"]["message"]:
                            problem = "not OpenAI's error shape"
                    except ValueError:
                        problem = "not JSON"
                if problem:
                    failures.append((problem, case.method, case.path, response.status_code, repr(case.body)[:300],
                                     response.text[:300]))

            fuzz()
    finally:
        engine.close()
    total = sum(seen.values())
    print(f"\n{total} requests:", dict(sorted(seen.items())))
    assert total >= 1000
    assert not failures, "\n".join(map(str, failures[:8]))
    # the fuzz reached every route, and both answers: accepted requests and refused ones
    assert {path for _, path, _ in seen} >= {"/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                             "/v1/models", "/health"}
    assert {c for _, _, c in seen} >= {2, 4}
