"""The benchmark harness (vlm_prune/benchmark.py) on fake timed callables: an injected clock that
each call advances by a known cost, so order, medians, spread and ratios are exact."""

from __future__ import annotations

import contextlib
import json

import pytest

from vlm_prune.benchmark import RunLog, Stats, Variant, describe, measure, pinned_threads, report_table


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def task(self, name: str, costs):
        """A callable that logs its name and advances the clock by the next of `costs` (cycled)."""
        costs = list(costs)
        calls = iter(range(10**6))

        def run():
            self.log.append(name)
            self.now += costs[next(calls) % len(costs)]
            return name
        return run


def test_rounds_interleave_the_variants_after_the_warm_up_round():
    clock = FakeClock()
    variants = [Variant(n, clock.task(n, [1.0])) for n in ("a", "b", "c")]
    result = measure(variants, rounds=3, warmup_rounds=1, clock=clock)
    assert clock.log == ["a", "b", "c"] * 4  # one warm-up round, then three, each a, b, c in turn
    assert {n: len(result.samples[n]["time"]) for n in "abc"} == {"a": 3, "b": 3, "c": 3}  # warm-up discarded


def test_blocks_per_round_with_warm_up_calls_inside_around():
    clock = FakeClock()

    @contextlib.contextmanager
    def around():
        clock.log.append("enter")
        yield
        clock.log.append("exit")

    variants = [Variant("a", clock.task("a", [1.0]), around=around), Variant("b", clock.task("b", [2.0]))]
    result = measure(variants, rounds=2, per_round=3, warmup_rounds=0, warmup_calls=1, clock=clock)
    block_a = ["enter", "a", "a", "a", "a", "exit"]
    assert clock.log == (block_a + ["b"] * 4) * 2
    assert result.samples["a"]["time"] == [1.0] * 6 and result.samples["b"]["time"] == [2.0] * 6


def test_medians_spread_and_ratios_of_known_costs():
    clock = FakeClock()
    # the first cost of each is the warm-up round's (discarded): medians of [3, 1, 2, 5, 4] and [1, 0.5, 1.5, 1, 1]
    slow = clock.task("slow", [100.0, 3.0, 1.0, 2.0, 5.0, 4.0])
    fast = clock.task("fast", [100.0, 1.0, 0.5, 1.5, 1.0, 1.0])
    seen = iter(range(100))
    result = measure([Variant("slow", slow), Variant("fast", fast, extras=lambda out: {"stage": next(seen) / 10})],
                     rounds=5, warmup_rounds=1, clock=clock)
    assert result.median("slow") == 3.0 and result.median("fast") == 1.0
    assert result.ms("slow") == 3000.0
    assert result.ratio("slow", "fast") == 3.0
    assert result.samples["fast"]["stage"] == [0.1, 0.2, 0.3, 0.4, 0.5]  # extras of the timed calls only
    assert result.median("fast", "stage") == pytest.approx(0.3)
    s = result.stats("slow")
    assert (s.n, s.min, s.max, s.q1, s.q3, s.mean) == (5, 1.0, 5.0, 2.0, 4.0, 3.0)
    assert s.spread == pytest.approx(2.0 / 3.0)
    table = result.table(baseline="slow")
    assert "| slow | time | 5 | 3000.000 | 2000.000 | 1000.000 | 5000.000 | 66.7% | 1.000x |" in table
    assert "| fast | time | 5 | 1000.000 |" in table and "| 3.000x |" in table
    assert "| fast | stage | 5 | 300.000 |" in table and table.count("\n") == 4
    report = json.loads(json.dumps(result.to_dict()))
    assert report["variants"]["slow"]["time"]["median_ms"] == 3000.0
    assert report["settings"]["rounds"] == 5 and report["settings"]["timing"] == "host"
    assert report_table(report, baseline="slow") == table
    assert describe(report["settings"]).startswith("harness: 5 interleaved round(s)")


def test_stats_of_one_sample_and_of_none():
    assert Stats.of([2.0]) == Stats(1, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        Stats.of([])


def test_a_failing_variant_drops_its_group_and_the_others_go_on():
    clock = FakeClock()
    calls = iter(range(100))

    def flaky():
        if next(calls) == 2:  # fails in the second timed round
            raise RuntimeError("boom")
        clock.now += 1.0

    told = []
    variants = [Variant("base", clock.task("base", [1.0])), Variant("x sync", flaky, group="x"),
                Variant("x host", clock.task("x host", [2.0]), group="x"), Variant("y", clock.task("y", [4.0]))]
    result = measure(variants, rounds=4, warmup_rounds=1, clock=clock,
                     on_error=lambda v, e: told.append((v.name, str(e))))
    assert told == [("x sync", "boom")]
    assert result.failed("x sync") and result.failed("x host") and not result.failed("y")
    assert result.errors["x sync"] == "RuntimeError: boom"
    assert clock.log.count("x host") == 2 and clock.log.count("y") == 5  # dropped from the round it failed in
    assert len(result.samples["x sync"]["time"]) == 1  # the block that failed is not counted
    assert len(result.samples["base"]["time"]) == 4
    assert "x sync (failed)" in result.table()
    with pytest.raises(KeyError, match="it failed"):
        result.median("x host", "nothing")
    # without on_error the first error stops the run
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure([Variant("z", broken)], rounds=1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rounds=0"):
        measure([Variant("a", lambda: None)], rounds=0)
    with pytest.raises(ValueError, match="must differ"):
        measure([Variant("a", lambda: None), Variant("a", lambda: None)], rounds=1)
    with pytest.raises(ValueError, match="timing='wall'"):
        measure([Variant("a", lambda: None)], rounds=1, timing="wall")


def test_threads_are_pinned_for_the_run_and_restored():
    import torch

    before = torch.get_num_threads()
    seen = []
    measure([Variant("a", lambda: seen.append(torch.get_num_threads()))], rounds=1, warmup_rounds=0, threads=1)
    assert seen == [1] and torch.get_num_threads() == before
    with pinned_threads(None):
        assert torch.get_num_threads() == before


def test_run_log_keeps_the_report_and_the_numbers(tmp_path, capsys):
    log = RunLog(tmp_path / "out", "bench llava-1.5/0.25", json_path=tmp_path / "also.json")
    log.print("table")
    log.note("spread")
    log.save({"a": 1})
    assert capsys.readouterr().out == "table\n"
    txt, = (tmp_path / "out").glob("*.txt")
    assert txt.name.startswith("bench_llava-1.5_0.25-") and txt.read_text() == "table\nspread\n"
    assert json.loads(txt.with_name(txt.name[:-4] + ".json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "also.json").read_text()) == {"a": 1}
    assert len(log.paths) == 3
    quiet = RunLog(None, "x")
    quiet.print("only printed")
    quiet.save({"b": 2})
    assert quiet.paths == []


class FakeCuda:
    """torch.cuda's events, streams and graphs on a fake device clock (seconds): a task advances
    it by its cost when run, or appends its cost to the graph being captured."""

    def __init__(self, monkeypatch):
        import torch

        self.now = 0.0
        self.capturing: list | None = None
        self.syncs = 0
        self.captures = 0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.at = None

            def record(self):
                self.at = fake.now

            def elapsed_time(self, end):  # milliseconds, as CUDA's
                return 1000 * (end.at - self.at)

        class Graph:
            def __init__(self):
                self.costs = []

            def replay(self):
                fake.now += sum(self.costs)

        @contextlib.contextmanager
        def graph(g):
            fake.captures += 1
            fake.capturing = g.costs
            try:
                yield
            finally:
                fake.capturing = None

        class Stream:
            def wait_stream(self, other):
                pass

        def synchronize(device=None):
            fake.syncs += 1

        for name, value in dict(Event=Event, CUDAGraph=Graph, graph=graph, Stream=Stream, synchronize=synchronize,
                                stream=lambda s: contextlib.nullcontext(), current_stream=Stream).items():
            monkeypatch.setattr(torch.cuda, name, value)

    def task(self, cost: float, fails_capture: bool = False):
        def run():
            if self.capturing is not None:
                if fails_capture:
                    raise RuntimeError("operation not permitted when stream is capturing")
                self.capturing.append(cost)
            else:
                self.now += cost
        return run


def test_cuda_events_time_each_call_and_synchronise(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    result = measure([Variant("ref", cuda.task(0.004)), Variant("triton", cuda.task(0.001))], rounds=3,
                     warmup_rounds=2, timing="cuda_events")
    assert result.ms("ref") == pytest.approx(4.0) and result.ms("triton") == pytest.approx(1.0)
    assert result.ratio("ref", "triton") == pytest.approx(4.0)
    assert cuda.syncs == 2 * 5  # one per call, warm-up rounds included


def test_cuda_graph_replays_captured_calls_and_skips_what_cannot_be_captured(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    told = []
    result = measure([Variant("ref", cuda.task(0.004, fails_capture=True)), Variant("triton", cuda.task(0.001))],
                     rounds=3, warmup_rounds=2, timing="cuda_graph", graph_calls=20,
                     on_error=lambda v, e: told.append(v.name))
    assert told == ["ref"] and result.failed("ref") and "capturing" in result.errors["ref"]
    assert cuda.captures == 2  # each variant captured once, before the rounds
    assert result.ms("triton") == pytest.approx(1.0)  # a replay of 20 calls, divided by 20
    assert result.stats("triton").n == 3 and result.to_dict()["settings"]["graph_calls"] == 20
    assert "CUDA graph replays (20 calls per replay)" in describe(result.settings)
