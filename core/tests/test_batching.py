"""The dynamic batcher's scheduling: which requests share a batch, who gets which answer, what a
full queue, a bad request and a deleted deployment do. The runner here answers instantly (its
model is not what is under test) and can be held busy, so the schedule is deterministic."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gptstore.errors import GptstoreError, InvalidInput, Unavailable
from gptstore.protocols import StreamChunk
from gptstore.serving.batching import Batcher, Overloaded
from gptstore.types import Generation, GenerationRequest, RunnerHealth


class HeldRunner:
    """Echoes each prompt; ``hold`` keeps the next generate busy until ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.streamed = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()

    def generate(self, requests):
        self.started.set()
        self.gate.wait(10)
        prompts = [r.prompt for r in requests]
        if "bad" in prompts:
            raise InvalidInput("generation request", ["the prompt is bad @ $.prompt"])
        self.batches.append(prompts)
        return [
            Generation(text=p.upper(), prompt_tokens=1, completion_tokens=1, finish_reason="length")
            for p in prompts
        ]

    def stream(self, request):
        """One chunk per character of the prompt; "bad" fails before the first."""
        self.batches.append([f"stream:{request.prompt}"])
        if request.prompt == "bad":
            raise InvalidInput("generation request", ["the prompt is bad @ $.prompt"])
        for i, char in enumerate(request.prompt):
            time.sleep(0.001)  # a token at a time, as a model decodes
            self.streamed += 1
            last = i == len(request.prompt) - 1
            yield StreamChunk(char.upper(), "length" if last else None)

    def health(self):
        return RunnerHealth(True)

    def close(self):
        pass


class Results:
    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.lock = threading.Condition()

    def callback(self, key: str):
        def done(result) -> None:
            with self.lock:
                self.values[key] = result
                self.lock.notify_all()

        return done

    def wait(self, count: int) -> dict[str, object]:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.values) >= count, timeout=10)
            return dict(self.values)


def requests(*prompts: str) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=p, max_tokens=1) for p in prompts]


def busy(max_batch: int, max_queue: int, name: str = "t"):
    """A batcher whose runner is busy with request "a" until ``runner.gate.set()``."""
    runner, results = HeldRunner(), Results()
    batcher = Batcher(runner, name, max_batch=max_batch, max_queue=max_queue)
    runner.hold()
    batcher.submit(requests("a"), results.callback("a"))
    assert runner.started.wait(5)  # "a" runs alone; what comes next queues behind it
    return batcher, runner, results


def test_requests_waiting_while_busy_share_batches_up_to_max_batch():
    batcher, runner, results = busy(4, 16)
    for key in "bcde":
        batcher.submit(requests(key), results.callback(key))
    batcher.submit(requests("f1", "f2", "f3"), results.callback("f"))  # one request, n=3
    runner.gate.set()
    got = results.wait(6)
    batcher.close()
    assert runner.batches == [["a"], ["b", "c", "d", "e"], ["f1", "f2", "f3"]]
    assert [g.text for g in got["f"]] == ["F1", "F2", "F3"]
    assert [g.text for g in got["c"]] == ["C"]
    assert (batcher.stats.batches, batcher.stats.rows, batcher.stats.largest) == (3, 8, 4)


def test_a_request_that_does_not_fit_waits_for_the_next_batch_in_order():
    batcher, runner, results = busy(3, 16)
    batcher.submit(requests("b", "b"), results.callback("b"))
    batcher.submit(requests("c", "c"), results.callback("c"))
    batcher.submit(requests("d"), results.callback("d"))
    runner.gate.set()
    results.wait(4)
    batcher.close()
    assert runner.batches == [["a"], ["b", "b"], ["c", "c", "d"]]


def test_a_full_queue_refuses_at_once():
    batcher, runner, results = busy(1, 2, "busy")
    batcher.submit(requests("b"), results.callback("b"))
    batcher.submit(requests("c"), results.callback("c"))
    with pytest.raises(Overloaded, match="'busy' is busy: 2 requests are waiting") as error:
        batcher.submit(requests("d"), results.callback("d"))
    assert error.value.retry_after >= 1
    runner.gate.set()
    assert sorted(results.wait(3)) == ["a", "b", "c"]
    batcher.close()


def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered():
    batcher, runner, results = busy(8, 16)
    for key in ("b", "bad", "c"):
        batcher.submit(requests(key), results.callback(key))
    runner.gate.set()
    got = results.wait(4)
    batcher.close()
    assert isinstance(got["bad"], InvalidInput)
    assert [g.text for g in got["b"]] == ["B"]
    assert [g.text for g in got["c"]] == ["C"]


def test_closing_answers_what_is_queued_and_refuses_what_comes_after():
    batcher, runner, results = busy(1, 8, "gone")
    batcher.submit(requests("b"), results.callback("b"))
    closing = threading.Thread(target=batcher.close)
    closing.start()
    closing.join(0.2)
    with pytest.raises(Unavailable, match="'gone' is being deleted"):
        batcher.submit(requests("c"), results.callback("c"))
    runner.gate.set()
    closing.join(10)
    got = results.wait(2)
    assert [g.text for g in got["a"]] == ["A"]
    assert [g.text for g in got["b"]] == ["B"]
    assert not closing.is_alive()


def test_streams_take_their_turn_in_the_queue_alone_and_in_order():
    async def scenario():
        runner = HeldRunner()
        batcher = Batcher(runner, "t", max_batch=8, max_queue=16)
        runner.hold()
        first = asyncio.ensure_future(batcher.generate(requests("a")))
        await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, 5)
        second = asyncio.ensure_future(batcher.generate(requests("b")))
        chunks = batcher.stream(requests("xy", "z"))  # n=2: two choices, one after the other
        streamed = asyncio.ensure_future(_collect(chunks))
        await asyncio.sleep(0.05)  # the stream is queued before "c"
        third = asyncio.ensure_future(batcher.generate(requests("c")))
        await asyncio.sleep(0.05)
        runner.gate.set()
        answers = [await first, await second, await third]
        items = await streamed
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        return runner, answers, items, batcher

    runner, answers, items, batcher = asyncio.run(scenario())
    assert runner.batches == [["a"], ["b"], ["stream:xy"], ["stream:z"], ["c"]]
    assert [a[0].text for a in answers] == ["A", "B", "C"]
    assert [(i, c.text, c.finish_reason) for i, c in items] == [
        (0, "X", None),
        (0, "Y", "length"),
        (1, "Z", "length"),
    ]
    assert batcher.stats.streams == 1


def test_a_stream_left_by_its_client_stops_at_the_next_token():
    async def scenario():
        runner = HeldRunner()
        batcher = Batcher(runner, "t", max_batch=8, max_queue=16)
        chunks = batcher.stream(requests("abcdefghijklmnopqrstuvwxyz" * 40))
        first = await anext(chunks)
        await chunks.aclose()  # what the server does when the client disconnects
        after = await batcher.generate(requests("next"))
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        return runner, first, after

    runner, first, after = asyncio.run(scenario())
    assert first[1].text == "A"
    assert after[0].text == "NEXT"  # the worker went on to the next request
    assert runner.streamed < 500  # and did not decode the rest of the abandoned stream


def test_a_stream_that_fails_raises_in_its_reader_and_the_worker_goes_on():
    async def scenario():
        batcher = Batcher(HeldRunner(), "t", max_batch=8, max_queue=16)
        with pytest.raises(InvalidInput, match="the prompt is bad"):
            await _collect(batcher.stream(requests("bad")))
        answer = await batcher.generate(requests("fine"))
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        return answer

    assert asyncio.run(scenario())[0].text == "FINE"


def test_a_request_larger_than_max_batch_runs_in_parts_and_answers_whole():
    runner, results = HeldRunner(), Results()
    batcher = Batcher(runner, "t", max_batch=2, max_queue=4)
    batcher.submit(requests("a", "b", "c", "d", "e"), results.callback("big"))
    got = results.wait(1)
    batcher.close()
    assert runner.batches == [["a", "b"], ["c", "d"], ["e"]]
    assert [g.text for g in got["big"]] == ["A", "B", "C", "D", "E"]


def test_a_runner_that_answers_too_few_fails_the_batch_instead_of_shifting_answers():
    class Short(HeldRunner):
        def generate(self, requests):
            return super().generate(requests)[:-1]

    results = Results()
    batcher = Batcher(Short(), "short", max_batch=4, max_queue=4)
    batcher.submit(requests("a", "b"), results.callback("ab"))
    got = results.wait(1)
    batcher.close()
    assert isinstance(got["ab"], GptstoreError)
    assert "answered 1 of 2 requests" in str(got["ab"])
    assert not batcher.alive  # closed; it had not died before


async def _collect(chunks):
    return [item async for item in chunks]
