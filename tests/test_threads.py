"""Tests for imgcls.threads: usable cores (affinity, cgroup quotas), the choice between one thread
and all of them from timings (fake ones here), the re-checks between epochs and between inference
calls, and the choice as a training run records it in model.json."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from conftest import quiet
from imgcls.threads import (
    HOW_ASKED,
    HOW_DETERMINISTIC,
    HOW_MEASURED,
    HOW_ONE_CORE,
    ThreadChoice,
    ThreadTuner,
    ThreadWatch,
    cgroup_cpu_limit,
    decode_workers,
    fixed_choice,
    measure_choice,
    pick_threads,
    usable_cores,
)
from synth import make_class_folders

# ----------------------------------------------------------------------------- usable cores


def cgroup(tmp_path: pathlib.Path, proc: str, files: dict[str, str]) -> tuple[pathlib.Path, pathlib.Path]:
    """A fake cgroup tree under tmp_path/root and a fake /proc/self/cgroup; (root, proc file)."""
    root = tmp_path / "root"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc_file = tmp_path / "proc_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_usable_cores_is_the_affinity_without_a_quota(tmp_path):
    root, proc = cgroup(tmp_path, "0::/app\n", {"app/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cores({0, 1, 2}, root, proc) == 3
    assert usable_cores(set(), root, proc) == 1  # never below one


@pytest.mark.parametrize(("cpu_max", "cores"), [("150000 100000", 1), ("250000 100000", 2), ("50000 100000", 1), ("800000 100000", 4)])
def test_cgroup_v2_quota_rounds_down_within_the_affinity(tmp_path, cpu_max, cores):
    root, proc = cgroup(tmp_path, "0::/user.slice/app\n", {"user.slice/app/cpu.max": cpu_max})
    assert usable_cores({0, 1, 2, 3}, root, proc) == cores


def test_cgroup_v2_quota_of_a_parent_limits_the_child(tmp_path):
    files = {"user.slice/cpu.max": "100000 100000", "user.slice/app/cpu.max": "max 100000"}
    root, proc = cgroup(tmp_path, "0::/user.slice/app\n", files)
    assert cgroup_cpu_limit(root, proc) == 1.0
    assert usable_cores({0, 1}, root, proc) == 1


def test_cgroup_inside_a_container_reads_the_mount_itself(tmp_path):
    # a cgroup namespace shows "/" as the path; the quota is on the mount's own files
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "200000 100000"})
    assert usable_cores({0, 1, 2, 3, 4, 5}, root, proc) == 2


def test_cgroup_v1_cfs_quota(tmp_path):
    files = {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}
    root, proc = cgroup(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", files)
    assert usable_cores({0, 1}, root, proc) == 1


def test_cgroup_v1_without_a_quota_and_unreadable_files(tmp_path):
    files = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000", "unified/cpu.max": "garbage"}
    root, proc = cgroup(tmp_path, "1:cpu:/\n0::/\n", files)
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cores({0, 1}, root, proc) == 2


def test_decode_workers_leave_the_inference_thread_a_core():
    assert [decode_workers(n) for n in (1, 2, 3, 5, 16)] == [1, 1, 2, 4, 4]


# ----------------------------------------------------------------------------- the choice


def test_busy_machine_picks_one_thread_quiet_machine_keeps_all():
    # issue 19's measurements: small_cnn step, 2 cores
    assert pick_threads({2: 108, 1: 240}) == 1  # one other busy process
    assert pick_threads({2: 428, 1: 240}) == 2  # quiet
    assert pick_threads({2: 100, 1: 110}) == 2  # within the margin: all threads stay
    assert pick_threads({8: 100, 4: 190, 1: 120}) == 4
    with pytest.raises(ValueError):
        pick_threads({})


def test_choice_says_why_in_the_log_and_model_json():
    busy = ThreadChoice(1, 2, HOW_MEASURED, {2: 110.0, 1: 240.0})
    assert busy.describe() == "threads: 1 (2 usable cores; 2 threads ran 110 img/s, 1 thread ran 240 img/s: the cores are shared)"
    assert busy.to_dict() == {"threads": 1, "usable_cores": 2, "how": "measured", "images_per_s": {"2": 110.0, "1": 240.0}}
    assert "shared" not in ThreadChoice(2, 2, HOW_MEASURED, {2: 428.0, 1: 240.0}).describe()
    assert busy.adaptive and not ThreadChoice(3, 2, HOW_ASKED).adaptive


def test_asked_threads_win_and_deterministic_fixes_the_count_without_timing():
    def no_timing(threads: int) -> float:
        raise AssertionError("timed although the count was fixed")

    assert fixed_choice(3, 2) == ThreadChoice(3, 2, HOW_ASKED)
    assert fixed_choice(1, 4, deterministic=True) == ThreadChoice(1, 4, HOW_DETERMINISTIC)
    assert fixed_choice(None, 4, deterministic=True) == ThreadChoice(4, 4, HOW_DETERMINISTIC)
    assert fixed_choice(None, 1) == ThreadChoice(1, 1, HOW_ONE_CORE)
    assert fixed_choice(None, 2) is None  # to be measured
    assert measure_choice(1, no_timing).threads == 1  # one core: nothing to compare
    timed = []
    choice = measure_choice(2, lambda n: timed.append(n) or {2: 108.0, 1: 240.0}[n], known={2: 108.0})
    assert timed == [1] and choice.threads == 1 and choice.rates == {2: 108.0, 1: 240.0}


# ----------------------------------------------------------------------------- inference: ThreadTuner


class FakeMachine:
    """A clock and a forward pass whose seconds per image depend on the thread count and the load."""

    def __init__(self, busy: bool = False) -> None:
        self.now, self.busy, self.threads, self.calls = 0.0, busy, 2, []

    def rate(self, threads: int) -> float:  # images/s
        return {(2, False): 428.0, (1, False): 240.0, (2, True): 108.0, (1, True): 240.0}[(threads, self.busy)]

    def set_threads(self, n: int) -> None:
        self.threads = n

    def forward(self, x: np.ndarray) -> int:
        self.calls.append(self.threads)
        self.now += len(x) / self.rate(self.threads)
        return self.threads


def tuner_for(m: FakeMachine, **kw) -> ThreadTuner:
    return ThreadTuner(2, clock=lambda: m.now, get_threads=lambda: m.threads, set_threads=m.set_threads, **kw)


def test_tuner_picks_one_thread_on_a_busy_machine_and_puts_the_count_back():
    m, lines = FakeMachine(busy=True), []
    tuner = tuner_for(m, log=lines.append)
    batch = np.zeros((64, 1))
    used = [tuner.run(m.forward, batch, len(batch)) for _ in range(8)]
    assert used[:5] == [2, 2, 1, 2, 1]  # warm-up, then the trial alternates
    assert used[5:] == [1, 1, 1] and tuner.choice.threads == 1
    assert m.threads == 2  # the caller's count is back after every call
    assert lines == [tuner.choice.describe()] and "the cores are shared" in lines[0]


def test_tuner_keeps_all_threads_on_a_quiet_machine():
    m = FakeMachine(busy=False)
    tuner = tuner_for(m)
    for _ in range(10):
        tuner.run(m.forward, np.zeros((64, 1)), 64)
    assert tuner.choice.threads == 2 and m.calls[5:] == [2] * 5


def test_tuner_rechecks_and_follows_the_load():
    m = FakeMachine(busy=True)
    tuner = tuner_for(m, recheck_s=5.0)
    batch = np.zeros((64, 1))
    for _ in range(6):
        tuner.run(m.forward, batch, 64)
    assert tuner.choice.threads == 1
    m.busy = False  # the neighbour finished
    for _ in range(200):  # ~53 s of calls; a re-check is due after 5 s, and once it costs at most 5% of the time since the last
        tuner.run(m.forward, batch, 64)
    assert tuner.choice.threads == 2
    trial_calls = sum(1 for a, b in zip(m.calls[6:], m.calls[7:]) if a != b)
    assert trial_calls <= 6  # one re-trial, not a trial every call


def test_tuner_sees_a_busier_machine_within_a_few_calls():
    m = FakeMachine(busy=False)
    tuner = tuner_for(m)
    batch = np.zeros((64, 1))
    for _ in range(8):
        tuner.run(m.forward, batch, 64)
    assert tuner.choice.threads == 2
    m.busy = True  # a neighbour starts: two slow calls in a row start a trial at once, no waiting for RECHECK_S
    for _ in range(8):
        tuner.run(m.forward, batch, 64)
    assert tuner.choice.threads == 1 and m.now < 5.0


def test_tuner_on_a_quiet_machine_never_retries_one_thread():
    m = FakeMachine(busy=False)
    tuner = tuner_for(m, recheck_s=1.0)
    for _ in range(300):  # ~45 s
        tuner.run(m.forward, np.zeros((64, 1)), 64)
    assert m.calls.count(1) == 2  # the first trial's two calls only


def test_tuner_with_asked_threads_times_nothing():
    m = FakeMachine(busy=True)
    tuner = tuner_for(m, fixed=3)
    seen = []
    for _ in range(8):
        tuner.run(lambda x: seen.append(m.threads), np.zeros((8, 1)), 8)
    assert seen == [3] * 8 and tuner.choice == ThreadChoice(3, 2, HOW_ASKED)


def test_tuner_leaves_small_batches_untimed():
    m = FakeMachine(busy=True)
    tuner = tuner_for(m)
    tuner.run(m.forward, np.zeros((64, 1)), 64)  # warm-up
    tuner.run(m.forward, np.zeros((64, 1)), 64)  # trial: all threads
    tuner.run(m.forward, np.zeros((3, 1)), 3)  # a last, partial batch: at the current count, untimed
    assert m.calls == [2, 2, 2] and tuner.plan == [1, 2, 1]


def test_tuner_keeps_the_count_a_compiled_model_was_built_with():
    # inductor writes the thread count into its kernels: a compile during a trial call at one
    # thread fixes one thread from then on, and nothing is timed any more
    m = FakeMachine(busy=False)
    tuner = tuner_for(m)
    compiled = [False]

    def forward(x):
        compiled[0] = compiled[0] or m.threads == 1  # CompiledForward compiles on this call
        return m.forward(x)

    for _ in range(8):
        tuner.run(forward, np.zeros((64, 1)), 64, frozen=lambda: compiled[0])
    assert m.calls == [2, 2, 1, 1, 1, 1, 1, 1] and tuner.choice.threads == 1 and tuner.plan == []
    m2 = FakeMachine(busy=True)
    first = tuner_for(m2)  # compile="on": the first call compiles, at all threads
    for _ in range(6):
        first.run(m2.forward, np.zeros((64, 1)), 64, frozen=lambda: True)
    assert m2.calls == [2] * 6


def test_tuner_sets_the_threads_in_the_thread_that_runs_the_forward():
    # torch's count is per thread: a server's inference thread must set its own
    import threading

    tuner, seen = ThreadTuner(2, fixed=1), []
    t = threading.Thread(target=lambda: tuner.run(lambda x: seen.append(torch.get_num_threads()), [0], 1))
    t.start()
    t.join()
    assert seen == [1]


# ----------------------------------------------------------------------------- training: ThreadWatch


def test_watch_costs_nothing_on_a_quiet_machine():
    def no_probe(threads: int) -> float:
        raise AssertionError("probed a quiet machine")

    watch = ThreadWatch(ThreadChoice(2, 2, HOW_MEASURED, {2: 428.0, 1: 240.0}))
    for rate in (420.0, 400.0, 435.0, 410.0):
        assert watch.after_epoch(rate, 10.0, no_probe) is None


def test_watch_switches_when_the_machine_gets_busier_then_quieter():
    clock = [0.0]

    def probe_at(rates):
        def probe(threads: int) -> float:
            clock[0] += 1.0  # a probe takes 1 s
            return rates[threads]

        return probe

    watch = ThreadWatch(ThreadChoice(2, 2, HOW_MEASURED, {2: 428.0, 1: 240.0}), clock=lambda: clock[0])
    new = watch.after_epoch(108.0, 30.0, probe_at({1: 240.0}))  # a neighbour took a core
    assert new is not None and new.threads == 1 and new.rates == {2: 108.0, 1: 240.0}
    assert watch.after_epoch(240.0, 10.0, probe_at({2: 108.0})) is None  # too soon: 1 s of probe in 10 s trained
    assert watch.after_epoch(240.0, 10.0, probe_at({2: 108.0})) is None  # probed (20 s trained), still busy
    assert watch.after_epoch(240.0, 5.0, probe_at({2: 428.0})) is None  # too soon after that probe
    back = watch.after_epoch(240.0, 20.0, probe_at({2: 428.0}))  # quiet again
    assert back is not None and back.threads == 2


def test_watch_probes_at_once_when_all_threads_slow_down():
    watch = ThreadWatch(ThreadChoice(2, 2, HOW_MEASURED, {2: 428.0, 1: 240.0}), probe_s=100.0)  # an expensive probe
    new = watch.after_epoch(150.0, 5.0, {1: 240.0}.__getitem__)
    assert new is not None and new.threads == 1
    # a slowdown one thread does not cure: all threads kept, and that rate becomes what is expected
    watch = ThreadWatch(ThreadChoice(2, 2, HOW_MEASURED, {2: 428.0, 1: 240.0}))
    assert watch.after_epoch(200.0, 5.0, {1: 120.0}.__getitem__) is None
    assert watch.after_epoch(190.0, 5.0, lambda n: pytest.fail("probed again")) is None


# ----------------------------------------------------------------------------- recorded by training and used by inference


def small_fit(tmp_path: pathlib.Path, name: str, epochs: int, **train) -> dict:
    """model.json of small_cnn trained on 18 tiny images (fp32: no precision trial, to stay fast)."""
    from imgcls.config import DataConfig, RunConfig, TrainConfig
    from imgcls.training.fit import fit
    from imgcls.transforms import AugmentSpec

    data = make_class_folders(tmp_path / "data", per_class=6, size=16, seed=3)
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, seed=0),
        train=TrainConfig(
            out=str(tmp_path / name), epochs=epochs, batch_size=4, precision="fp32", augment=AugmentSpec(crop="none"), **train
        ),
    )
    run = fit(cfg, progress=False, log=quiet)
    return json.loads((run / "model.json").read_text())


def test_training_measures_the_threads_and_records_the_choice(tmp_path, monkeypatch):
    import imgcls.training.build as build_mod

    monkeypatch.setattr(build_mod, "usable_cores", lambda: 2)  # measured whatever the test machine has
    meta = small_fit(tmp_path, "run", epochs=2)
    choice = meta["thread_choice"]
    assert choice["how"] == "measured" and choice["usable_cores"] == 2
    rates = choice["images_per_s"]
    assert set(rates) == {"2", "1"} and all(r > 0 for r in rates.values())
    assert meta["threads"] == choice["threads"] == (1 if rates["1"] > 1.15 * rates["2"] else 2)
    assert all(s["after_epoch"] == 1 and s["threads"] in (1, 2) for s in choice["switches"])


def test_training_with_asked_threads_times_none(tmp_path, monkeypatch):
    import imgcls.training.build as build_mod

    def no_timing(*args, **kwargs):
        raise AssertionError("timed threads although the count was fixed")

    monkeypatch.setattr(build_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(build_mod, "faster_thread_count", no_timing)
    meta = small_fit(tmp_path, "asked", epochs=1, threads=1)
    assert meta["threads"] == 1 and meta["thread_choice"] == {
        "threads": 1,
        "usable_cores": 2,
        "how": "asked",
        "images_per_s": {},
        "switches": [],
    }


def test_deterministic_training_fixes_the_threads_without_timing(monkeypatch):
    import imgcls.training.build as build_mod
    from imgcls.config import TrainConfig

    def no_timing(*args, **kwargs):
        raise AssertionError("a deterministic run timed its threads")

    monkeypatch.setattr(build_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(build_mod, "faster_thread_count", no_timing)
    t_cfg = TrainConfig(out="unused", deterministic=True, threads=2)  # as fit.pin_timed_choices leaves it
    choice, step_s = build_mod.choose_train_threads(None, None, None, None, None, t_cfg, True, quiet)
    assert choice == ThreadChoice(2, 2, HOW_DETERMINISTIC) and step_s is None


def test_classifier_runs_forward_passes_at_the_asked_threads():
    from imgcls.models import create_model, get_entry
    from imgcls.predict import Classifier

    model = create_model("small_cnn", num_classes=3)
    seen = []
    model.register_forward_pre_hook(lambda m, x: seen.append(torch.get_num_threads()))
    meta = {"arch": "small_cnn", "class_names": ["a", "b", "c"], "preprocess": get_entry("small_cnn").default_spec.to_dict()}
    clf = Classifier(model, meta, precision="fp32", compile="off", threads=1)
    before = torch.get_num_threads()
    size = clf.spec.cache_size
    clf.predict_arrays(np.zeros((3, size, size, 3), np.uint8))
    assert seen == [1] and torch.get_num_threads() == before


def test_server_decode_pool_leaves_the_inference_thread_a_core(monkeypatch):
    pytest.importorskip("fastapi")
    import imgcls.serve as serve_mod
    from imgcls.models import create_model, get_entry
    from imgcls.predict import Classifier
    from imgcls.serve import ServeSettings

    meta = {"arch": "small_cnn", "class_names": ["a", "b"], "preprocess": get_entry("small_cnn").default_spec.to_dict()}
    clf = Classifier(create_model("small_cnn", num_classes=2), meta, precision="fp32", compile="off")
    for usable, workers in ((2, 1), (4, 3), (16, 4)):
        monkeypatch.setattr(serve_mod, "usable_cores", lambda usable=usable: usable)
        assert serve_mod._Service(clf, ServeSettings(), None).decode_workers == workers
    assert serve_mod._Service(clf, ServeSettings(decode_workers=3), None).decode_workers == 3  # as asked


def test_threads_flag_reaches_predict_and_evaluate(trained_run, capsys, monkeypatch):
    """`--threads N` on predict and evaluate is the count every forward pass runs at: no trial."""
    import imgcls.evaluate as evaluate_mod
    import imgcls.predict as predict_mod
    from imgcls.cli import main

    made = []

    class Spy(ThreadTuner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(predict_mod, "ThreadTuner", Spy)
    monkeypatch.setattr(evaluate_mod, "ThreadTuner", Spy)
    run, data = trained_run
    image = next(p for p in sorted(data.rglob("*")) if p.suffix.lower() in (".png", ".jpg"))
    assert main(["predict", str(run), str(image), "--threads", "1", "--json"]) == 0
    assert "label" in capsys.readouterr().out
    out_dir = run.parent / "eval_threads"  # the report goes beside the shared run folder, not into it
    assert main(["evaluate", str(run), str(data), "--threads", "1", "--json", "--out", str(out_dir)]) == 0
    assert len(made) == 2 and all(t.choice == ThreadChoice(1, t.choice.usable, HOW_ASKED) for t in made)
