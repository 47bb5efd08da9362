"""The dynamic batcher's scheduling: which requests share a batch, who gets which answer, what a
full queue, a bad request and a deleted deployment do. The runner here answers instantly (its
model is not what is under test) and can be held busy, so the schedule is deterministic."""

from __future__ import annotations

import threading

import pytest

from gptstore.errors import GptstoreError, InvalidInput
from gptstore.server.batching import Batcher, Overloaded
from gptstore.types import Generation, GenerationRequest, RunnerHealth


class HeldRunner:
    """Echoes each prompt; ``hold`` keeps the next generate busy until ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
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
    with pytest.raises(GptstoreError, match="'gone' is being deleted"):
        batcher.submit(requests("c"), results.callback("c"))
    runner.gate.set()
    closing.join(10)
    got = results.wait(2)
    assert [g.text for g in got["a"]] == ["A"]
    assert [g.text for g in got["b"]] == ["B"]
    assert not closing.is_alive()
