"""torch's threads in our processes: from the cores a process may use, pinned by OMP_NUM_THREADS,
and a training loop that keeps to the faster count while a neighbour comes and goes."""

import os
import subprocess
import sys

import torch

from model.threads import ThreadTuner, default_threads
from storage.processes import usable_cores

PRINT_THREADS = "import model, torch; print(torch.get_num_threads())"


def _threads_in_a_new_process(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MEDLM_CORES", "LOCAL_WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", PRINT_THREADS], env=clean | env, capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def test_a_new_process_takes_the_cores_it_may_use_its_share_under_torchrun_or_the_pinned_count():
    cores = len(os.sched_getaffinity(0))
    assert _threads_in_a_new_process() == str(usable_cores()) and usable_cores() <= cores
    assert _threads_in_a_new_process(MEDLM_CORES="1") == "1"  # a worker's share of a machine it shares
    assert _threads_in_a_new_process(MEDLM_CORES="64") == str(usable_cores())  # never more than it has
    assert _threads_in_a_new_process(LOCAL_WORLD_SIZE="2") == str(max(1, usable_cores() // 2))
    assert _threads_in_a_new_process(OMP_NUM_THREADS="3", MEDLM_CORES="1") == "3"
    assert "MEDLM_CORES='two': expected a valid integer" in _threads_in_a_new_process(MEDLM_CORES="two")
    assert "OMP_NUM_THREADS='0': expected a whole number of threads >= 1" in _threads_in_a_new_process(OMP_NUM_THREADS="0")


class Machine:
    """Step seconds of a 2-core machine as measured (benchmarks/threads.py): 0.2 s on two threads
    and 0.36 s on one when quiet; beside a busy core, 0.6 s on two threads and 0.36 s on one."""

    def __init__(self):
        self.neighbour = False

    def step(self) -> float:
        two = torch.get_num_threads() == 2
        return (0.6 if self.neighbour else 0.2) if two else 0.36


def test_the_tuner_keeps_to_the_faster_count_as_a_neighbour_comes_and_goes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    machine, used = Machine(), []
    tuner = ThreadTuner(2)
    for step in range(1, 601):
        machine.neighbour = 100 < step <= 300
        used.append(torch.get_num_threads())
        tuner.after_step(machine.step(), step)
    tuner.close()
    assert torch.get_num_threads() == before
    assert used[:5] == [2] * 5 and used[5:7] == [1, 1] and used[7:100].count(2) >= 90  # an early probe, then two threads
    assert used[100:102] == [2, 2] and used[102:300].count(1) >= 185  # two slow steps after the neighbour came: one thread
    assert used[360:].count(2) >= 230  # and a quiet machine pays for few probes: the interval doubles


def test_the_tuner_stays_off_on_one_thread_and_when_the_count_is_pinned(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2
    pinned = ThreadTuner.for_device(torch.device("cpu"))
    assert not pinned.active
    machine, used = Machine(), []
    machine.neighbour = True
    for step in range(1, 50):
        used.append(torch.get_num_threads())
        pinned.after_step(machine.step(), step)
    pinned.close()
    assert set(used) == {2}  # the same count every step: the same losses to the bit, whatever the load
    assert not ThreadTuner(1).active


def test_torchrun_processes_get_their_share_of_the_cores_unless_the_count_is_pinned(monkeypatch):
    from model.distributed import Launch, launch_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    job = Launch("model.train", (), devices=2)
    assert launch_env(job)["OMP_NUM_THREADS"] == str(max(1, usable_cores() // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch_env(job)["OMP_NUM_THREADS"] == "3"


def test_a_models_passes_start_on_one_thread_and_probe_the_default_count_unless_a_count_is_given(monkeypatch):
    """Scoring and generation (model/scoring.py): beside a busy core a tiny model's pass took 100x
    longer on two threads than on one, so passes start on one thread and the tuner probes the
    default count; a count the caller gives (evaluation's `threads`) is kept for every pass."""
    from tokenizers import Tokenizer, models

    from model.model import ModelConfig, Transformer
    from model.scoring import TransformerLM

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.manual_seed(0)
    lm = TransformerLM(Transformer(ModelConfig.preset("tiny", vocab_size=512)), Tokenizer(models.BPE()), batch_tokens=200)
    used: list[int] = []
    lm.model.register_forward_pre_hook(lambda *_: used.append(torch.get_num_threads()))
    documents = torch.randint(4, 512, (12, 150)).tolist()  # one window, one pass, each
    before = torch.get_num_threads()

    lm.rolling_loglikelihoods(documents)
    cores = default_threads()
    assert used[:5] == [1] * 5 and (used[5] == cores if cores > 1 else set(used) == {1})  # warm-up and three passes, then a probe
    for count in (1, 2):
        used.clear()
        with lm.threads(count):
            lm.rolling_loglikelihoods(documents)
        assert used == [count] * len(documents)
    used.clear()
    lm.rolling_loglikelihoods(documents)  # the block's count is gone with it: the default again
    assert used[:5] == [1] * 5 and (used[5] == cores if cores > 1 else set(used) == {1})
    assert torch.get_num_threads() == before  # and the process's count is its own between calls
