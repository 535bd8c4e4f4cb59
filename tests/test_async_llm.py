"""``AsyncLLM`` in one event loop: concurrent tasks share steps, cancelling a task aborts its
request, the loop stays free while steps run; and the app's queue bound (429), in process."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ttscale.errors import InvalidArgument
from ttscale.sampling_params import SamplingParams
from ttscale.serve.async_llm import AsyncLLM
from ttscale.toy import policy_dir, prm_dir

PROMPT = "Q: (88-5)-18\n"


@pytest.fixture(scope="module")
def engine(one_thread):
    engine = AsyncLLM(policy_dir(), device="cpu")
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_concurrent_tasks_share_steps_and_match_running_alone(engine):
    params = [SamplingParams(n=2, temperature=1.0, max_tokens=40, ignore_eos=True, seed=s) for s in range(8)]

    async def one(p):
        last = None
        async for out in engine.generate(PROMPT, p):
            last = out
        return [c.token_ids for c in last.outputs]

    async def main():
        alone = [await one(params[0])]
        steps = engine.stats().steps
        together = await asyncio.gather(*[one(p) for p in params])
        return alone, together, engine.stats().steps - steps

    alone, together, steps = run(main())
    assert together[0] == alone[0]  # seeded: the same beside seven others
    assert steps < 2 * 40  # eight requests of 40 tokens in about 40 steps, not 320


def test_outputs_are_cumulative_and_end_finished(engine):
    async def main():
        seen = []
        async for out in engine.generate(PROMPT, SamplingParams(n=3, max_tokens=10, ignore_eos=True)):
            seen.append((out.finished, [len(c.token_ids) for c in out.outputs]))
        return seen

    seen = run(main())
    assert [f for f, _ in seen] == [False] * (len(seen) - 1) + [True]
    assert seen[-1][1] == [10, 10, 10] and [n for _, n in seen] == sorted(n for _, n in seen)


def test_cancelling_the_task_aborts_the_request(engine):
    async def main():
        total = engine.stats().total_blocks

        async def long():
            async for _ in engine.generate(PROMPT, SamplingParams(n=8, max_tokens=800, ignore_eos=True)):
                pass

        task = asyncio.create_task(long())
        while engine.stats().free_blocks == total:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.stats().free_blocks == total and not engine.llm.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(main())


def test_the_event_loop_keeps_running_while_steps_do(engine):
    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async def work():
            async for _ in engine.generate(PROMPT, SamplingParams(n=16, max_tokens=200, ignore_eos=True)):
                pass
            done.set()

        await asyncio.gather(ticker(), work())
        return ticks

    assert run(main()) > 10


def test_bad_arguments_raise_at_generate(engine):
    async def main():
        with pytest.raises(InvalidArgument) as caught:
            engine.generate(PROMPT, SamplingParams(max_tokens=100_000))
        return caught.value.param

    assert run(main()) == "max_tokens"


def test_search_runs_a_strategy(engine):
    import ttscale

    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu")

    async def main():
        return await engine.search("best_of_n", PROMPT, n=4, verifier=prm, prompt_fn=lambda p: p,
                                   step_delimiter="\n", sampling=SamplingParams(max_tokens=60))

    result = run(main())
    assert result.answer == "65" and len(result.candidates) == 4
    with pytest.raises(InvalidArgument, match="strategy"):
        run(engine.search("no_such_strategy", PROMPT))


def test_a_full_queue_is_429_with_retry_after(engine, monkeypatch):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from ttscale.serve.app import ServerConfig, build_app

    app = build_app(engine, ServerConfig(model_name="toy", max_queue=2))
    busy = dataclasses.replace(engine.stats(), waiting=2)
    monkeypatch.setattr(engine, "stats", lambda: busy)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})

    response = run(main())
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_search_and_requests_in_one_loop_both_finish(engine):
    """A search's thread runs steps too: requests it advances (or finishes) are still handed to
    their tasks."""
    import ttscale

    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu")

    async def request(i):
        last = None
        async for out in engine.generate(PROMPT, SamplingParams(n=2, max_tokens=30, seed=i)):
            last = out
        return last.finished

    async def main():
        search = engine.search("beam_search", PROMPT, n=8, beam_width=2, verifier=prm,
                               prompt_fn=lambda p: p, step_delimiter="\n",
                               sampling=SamplingParams(temperature=1.0, max_tokens=60))
        done = await asyncio.wait_for(asyncio.gather(search, *[request(i) for i in range(6)]), 120)
        return done

    result, *finished = run(main())
    assert result.answer == "65" and all(finished)
