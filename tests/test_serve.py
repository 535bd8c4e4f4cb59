"""``ttscale serve`` as users run it: the real server process on a loopback port with the toy
models, spoken to with the official ``openai`` client and ``httpx``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Q: (88-5)-18\n"  # the toy task's own prompt format


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``ttscale serve`` subprocess; stopped (SIGTERM, then kill) on close."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ttscale", "serve", "toy", "--prm", "toy", "--port", str(self.port),
             "--device", "cpu", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.close()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)
            if "ready at" in line:
                self.ready.set()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"),
                             max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if not s.labels}

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server():
    s = Server("--max-tokens", "64")
    yield s
    s.close()


def test_ready_line_health_and_models(server):
    assert any(f"ready at http://127.0.0.1:{server.port}" in line for line in server.lines)
    assert httpx.get(f"{server.url}/health").text == "ok"
    assert [m.id for m in server.client().models.list()] == ["toy"]


def test_completions_with_n(server):
    r = server.client().completions.create(model="toy", prompt=PROMPT, n=4, max_tokens=40,
                                           temperature=1.0, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.text and c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens == 4 * 14 // 4 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_completion_is_the_toy_solution(server):
    r = server.client().completions.create(model="toy", prompt=PROMPT, max_tokens=60, temperature=0)
    assert r.choices[0].text == "88-5=83\n83-18=65\nanswer: 65\n"
    assert r.choices[0].finish_reason == "stop"


def test_chat_streams_the_text_of_the_whole_answer(server):
    client = server.client()
    chunks = list(client.chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "(88-5)-18"}], max_tokens=60,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "(88-5)-18"}], max_tokens=60, temperature=0)
    assert text == whole.choices[0].message.content == "88-5=83\n83-18=65\nanswer: 65\n"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_token_id_prompts(server):
    from ttscale.model import load_tokenizer
    from ttscale.toy import policy_dir

    ids = load_tokenizer(policy_dir()).encode(PROMPT)
    client = server.client()
    one = client.completions.create(model="toy", prompt=ids, max_tokens=60, temperature=0)
    two = client.completions.create(model="toy", prompt=[ids, ids], max_tokens=60, temperature=0)
    assert one.choices[0].text == "88-5=83\n83-18=65\nanswer: 65\n"
    assert [c.text for c in two.choices] == [one.choices[0].text] * 2


def test_same_seed_same_text(server):
    client = server.client()
    ask = lambda seed: [c.text for c in client.completions.create(  # noqa: E731
        model="toy", prompt="Q: ((57+91)+45)-82\n", n=3, max_tokens=60, temperature=1.5, seed=seed).choices]
    first = ask(5)
    assert ask(5) == first
    assert any(ask(s) != first for s in (6, 7, 8))


def test_deepconf_through_the_extra_body(server):
    r = server.client().completions.create(
        model="toy", prompt=PROMPT, max_tokens=60,
        extra_body={"ttscale": {"strategy": "deepconf", "n": 8, "n_init": 4,
                                "confidence_window": 16, "confidence_score": "tail",
                                "confidence_tail": 16}})
    extra = r.model_extra["ttscale"]
    assert extra["strategy"] == "deepconf" and 4 <= len(extra["candidates"]) <= 8
    assert extra["cost"]["generated_tokens"] > 0


def test_beam_search_through_the_extra_body(server):
    r = server.client().completions.create(
        model="toy", prompt=PROMPT, max_tokens=60,
        extra_body={"ttscale": {"strategy": "beam_search", "n": 8, "beam_width": 4, "agg": "min"}})
    extra = r.model_extra["ttscale"]
    assert extra["strategy"] == "beam_search" and extra["answer"] == "65"
    assert extra["candidates"] and all(set(c) == {"text", "steps", "step_scores", "score", "answer"}
                                       for c in extra["candidates"])
    assert r.choices[0].text.endswith("answer: 65\n")
    assert extra["cost"]["generated_tokens"] > 0


def test_rsa_through_the_extra_body(server):
    r = server.client().completions.create(
        model="toy", prompt=PROMPT, max_tokens=60, temperature=1.0,
        extra_body={"ttscale": {"strategy": "rsa", "n": 4, "aggregation_size": 2,
                                "aggregation_rounds": 1}})
    extra = r.model_extra["ttscale"]
    assert extra["strategy"] == "rsa" and len(extra["candidates"]) == 4
    assert extra["cost"]["generated_tokens"] > 0
    assert extra["cost"]["prefilled_tokens"] > 14  # the prompt and the aggregation contexts


def test_best_of_returns_the_n_most_likely(server):
    r = server.client().completions.create(model="toy", prompt=PROMPT, n=2, max_tokens=60,
                                           temperature=1.0, seed=3, extra_body={"best_of": 6})
    assert len(r.choices) == 2


def test_metrics_are_prometheus_text(server):
    server.client().completions.create(model="toy", prompt=PROMPT, max_tokens=8)
    metrics = server.metrics()
    for name in ("ttscale_requests_running", "ttscale_requests_waiting",
                 "ttscale_generation_tokens_total", "ttscale_prompt_tokens_total",
                 "ttscale_kv_blocks_used", "ttscale_kv_blocks_total", "ttscale_preemptions_total",
                 "ttscale_prefix_cache_hit_tokens_total", "ttscale_request_latency_seconds_count",
                 "ttscale_time_to_first_token_seconds_count"):
        assert name in metrics, name
    assert metrics["ttscale_generation_tokens_total"] > 0 and metrics["ttscale_kv_blocks_total"] > 0


def test_sixteen_concurrent_clients_share_steps(server):
    before = server.metrics()["ttscale_steps_total"]
    results: list = [None] * 16

    def ask(i):
        results[i] = server.client().completions.create(
            model="toy", prompt=PROMPT, max_tokens=30, temperature=1.0, seed=i,
            extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.usage.completion_tokens == 30 for r in results)
    steps = server.metrics()["ttscale_steps_total"] - before
    assert steps < 16 * 30 / 2, steps  # one request after the other would take 480 steps


def test_a_client_that_goes_away_frees_its_blocks(server):
    idle = server.metrics()["ttscale_kv_blocks_used"]
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{server.url}/v1/completions",
            json={"model": "toy", "prompt": PROMPT, "max_tokens": 500, "n": 8, "stream": True,
                  "ignore_eos": True, "temperature": 1.0}) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i > 6:
                assert server.metrics()["ttscale_kv_blocks_used"] > idle  # still streaming
                break  # and gone: httpx closes the connection
    deadline = time.time() + 30
    while server.metrics()["ttscale_kv_blocks_used"] > idle and time.time() < deadline:
        time.sleep(0.2)
    assert server.metrics()["ttscale_kv_blocks_used"] == idle


BAD = [  # (route, body or raw bytes, status, param)
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "temperature": None, "top_p": "0.9"}, 400, "top_p"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "stop": 7}, 400, "stop"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "stop": {"a": 1}}, 400, "stop"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "n": 2000}, 400, "n"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "n": True}, 400, "n"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "seed": -3}, 400, "seed"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "top_k": 2.5}, 400, "top_k"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "min_p": 3}, 400, "min_p"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "toy", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "toy", "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": "toy", "prompt": [[[1, 2]]]}, 400, "prompt"),
    ("/v1/completions", {"model": "toy", "prompt": [1.5, 2.5]}, 400, "prompt"),
    ("/v1/completions", {"model": "toy", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "toy", "prompt": "Q: " + "1+" * 600 + "1\n"}, 400, "prompt"),
    ("/v1/completions", {"model": "toy"}, 400, "prompt"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "best_of": 1, "n": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {"strategy": "nope"}}, 400,
     "ttscale.strategy"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {"strategy": "beam_search",
                                                                       "beam_width": "wide"}}, 400, None),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": "beam"}, 400, "ttscale.strategy"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {"strategy": "beam_search", "n": 8,
                                                                       "beam_width": 3}}, 400,
     "ttscale.beam_width"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {"strategy": "revisions", "n": 4}},
     400, "ttscale.sequential"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {
        "strategy": "deepconf", "confidence_score": "median"}}, 400, "ttscale.confidence_score"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {
        "strategy": "deepconf", "n": 4, "n_init": 8}}, 400, "ttscale.n_init"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {"strategy": "rsa", "n": 2,
                                                                       "aggregation_size": 3}},
     400, "ttscale.aggregation_size"),
    ("/v1/completions", {"model": "toy", "prompt": PROMPT, "ttscale": {"strategy": "best_of_n",
                                                                       "temperature": 1}}, 400,
     "ttscale.temperature"),
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "toy", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "toy", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "1+1"}],
                              "top_logprobs": 3, "logprobs": "yes"}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ("/v1/nothing", {"model": "toy"}, 404, None),
]


@pytest.mark.parametrize("route, body, status, param", BAD,
                         ids=[f"{i}-{r.rsplit('/', 1)[-1]}-{p}" for i, (r, _, _, p) in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, route, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(
        body, bytes) else {"json": body}
    response = httpx.post(f"{server.url}{route}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error


def test_the_server_keeps_serving_after_bad_requests(server):
    for route, body, _, _ in BAD[:5]:
        httpx.post(f"{server.url}{route}", json=body, timeout=60)
    r = server.client().completions.create(model="toy", prompt=PROMPT, max_tokens=60, temperature=0)
    assert r.choices[0].text == "88-5=83\n83-18=65\nanswer: 65\n"


def test_a_body_over_the_limit_is_413(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b"x" * (17 << 20),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == 413


def test_api_key():
    s = Server("--api-key", "sesame")
    try:
        assert httpx.get(f"{s.url}/health").status_code == 200  # open: load balancers probe it
        denied = httpx.get(f"{s.url}/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert [m.id for m in s.client(api_key="sesame").models.list()] == ["toy"]
    finally:
        s.close()


def test_sigterm_finishes_the_requests_in_flight():
    s = Server("--grace", "60")
    results: list = [None] * 4

    def ask(i):
        results[i] = s.client().completions.create(model="toy", prompt=PROMPT, max_tokens=200,
                                                   temperature=1.0, seed=i, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while s.metrics()["ttscale_requests_running"] < 4 and time.time() < deadline:
        time.sleep(0.05)
    s.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert s.process.wait(60) == 0
    assert all(r is not None and r.usage.completion_tokens == 200 for r in results)


def test_the_readme_serve_example_runs_as_written(server):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Serve"):]
    command = re.search(r"```bash\n(ttscale serve[^\n]*)\n```", section)[1]
    assert command.split()[:3] == ["ttscale", "serve", "toy"]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    code = code.replace("http://127.0.0.1:8000", server.url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "answer: 65" in done.stdout


def test_missing_serve_extra_is_one_clear_line(monkeypatch, capsys):
    from ttscale import cli
    from ttscale.serve import server

    monkeypatch.setattr(server, "missing_modules", lambda: ["fastapi"])
    assert cli.main(["serve", "toy"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'ttscale[serve]'" in err and "Traceback" not in err


def test_json_error_shape_helper():
    from ttscale.serve.protocol import error_body

    assert json.loads(json.dumps(error_body("m", "t", "p", 400))) == {
        "error": {"message": "m", "type": "t", "param": "p", "code": 400}}


def test_a_streamed_search_sends_the_answer_then_done(server):
    chunks = list(server.client().completions.create(
        model="toy", prompt=PROMPT, max_tokens=60, stream=True,
        extra_body={"ttscale": {"strategy": "best_of_n", "n": 4}}))
    assert "".join(c.choices[0].text for c in chunks if c.choices).endswith("answer: 65\n")
    assert chunks[-1].model_extra["ttscale"]["event"] == "result"
    assert chunks[-1].model_extra["ttscale"]["answer"] == "65"


def test_a_streamed_search_reports_each_step_before_the_answer(server):
    chunks = list(server.client().chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "(88-5)-18"}], max_tokens=60, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ttscale": {"strategy": "beam_search", "n": 8, "beam_width": 4, "agg": "min"}}))
    events = [c.model_extra.get("ttscale") for c in chunks]
    progress = [e for e in events if e and e["event"] == "progress"]
    # beam search: one event per iteration (the toy's solutions are three steps), in order
    assert len(progress) >= 3 and [e["step"] for e in progress] == list(range(1, len(progress) + 1))
    assert all(set(e) == {"event", "problem", "step", "live", "finished", "best_score",
                          "generated_tokens"} for e in progress)
    assert all(0 <= e["live"] <= 8 and 0.0 <= e["best_score"] <= 1.0 for e in progress)
    tokens = [e["generated_tokens"] for e in progress]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert progress[-1]["finished"] >= 8 and progress[0]["finished"] < 8
    # progress chunks carry no choices; then the answer, then usage
    assert all(not c.choices for c, e in zip(chunks, events) if e and e["event"] == "progress")
    result = next(i for i, e in enumerate(events) if e and e["event"] == "result")
    assert result > max(i for i, e in enumerate(events) if e and e["event"] == "progress")
    assert events[result]["answer"] == "65" and chunks[result].choices[0].delta.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_a_streamed_search_whose_client_leaves_frees_its_blocks(server):
    idle = server.metrics()["ttscale_kv_blocks_used"]
    body = {"model": "toy", "prompt": PROMPT, "max_tokens": 60, "stream": True,
            "ttscale": {"strategy": "beam_search", "n": 64, "beam_width": 4, "max_iterations": 40}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
        assert json.loads(first[5:])["ttscale"]["event"] == "progress"
    deadline = time.time() + 30  # the search stops at its next step
    while server.metrics()["ttscale_kv_blocks_used"] != idle and time.time() < deadline:
        time.sleep(0.1)
    assert server.metrics()["ttscale_kv_blocks_used"] == idle
    assert server.client().completions.create(model="toy", prompt=PROMPT, max_tokens=8).choices


def test_completion_logprobs_and_echo(server):
    r = server.client().completions.create(model="toy", prompt=PROMPT, max_tokens=60, temperature=0,
                                           logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text == PROMPT + "88-5=83\n83-18=65\nanswer: 65\n"
    assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 and all(lp <= 0 for lp in top.values()) for top in choice.logprobs.top_logprobs)
