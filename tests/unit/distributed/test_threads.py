"""Thread counts from the placement (distributed/threads.py): pure rules, checked by hand."""

from rlhf_system.distributed.threads import engine_cpu_bind, trainer_threads


def test_cpu_only_roles_share_the_node_among_their_own_ranks():
    assert trainer_threads(0, gpus_per_node=0, cpus_per_worker=1, share=1, ranks_on_node=1, cores=16) == 16
    assert trainer_threads(0, gpus_per_node=0, cpus_per_worker=1, share=1, ranks_on_node=4, cores=16) == 4
    assert trainer_threads(0, gpus_per_node=0, cpus_per_worker=1, share=1, ranks_on_node=3, cores=2) == 1


def test_gpu_workers_get_their_bundle_cpus_split_among_colocated_roles():
    assert trainer_threads(0, gpus_per_node=8, cpus_per_worker=12, share=1, ranks_on_node=8, cores=96) == 12
    assert trainer_threads(0, gpus_per_node=8, cpus_per_worker=12, share=2, ranks_on_node=8, cores=96) == 6
    assert trainer_threads(0, gpus_per_node=8, cpus_per_worker=1, share=2, ranks_on_node=8, cores=96) == 1


def test_override_wins():
    assert trainer_threads(5, gpus_per_node=0, cpus_per_worker=1, share=1, ranks_on_node=2, cores=2) == 5


def test_engines_split_the_node_and_tp_workers_split_the_engine():
    cores = list(range(8))
    assert engine_cpu_bind(cores, 0, 1, 1) == "0,1,2,3,4,5,6,7"
    assert engine_cpu_bind(cores, 1, 2, 1) == "4,5,6,7"
    assert engine_cpu_bind(cores, 0, 1, 2) == "0,1,2,3|4,5,6,7"
    assert engine_cpu_bind([0, 1], 2, 3, 1) == "1"  # more engines than cores: at least one core each


def test_disjoint_cores_split_the_node_at_the_engine_share():
    from rlhf_system.distributed.threads import split_cores

    assert split_cores([0, 1], 0.5) == ([0], [1])
    assert split_cores(list(range(16)), 0.25) == ([0, 1, 2, 3], list(range(4, 16)))
    assert split_cores(list(range(4)), 0.9) == ([0, 1, 2], [3])  # at least one core each side
    assert split_cores([5], 0.5) == ([5], [5])  # one core cannot be split


def test_cores_are_split_when_generation_runs_beside_training():
    from rlhf_system.config import RunConfig

    def cfg(**over):
        c = RunConfig(mode="ppo")
        for dotted, v in over.items():
            section, key = dotted.split("__")
            setattr(getattr(c, section), key, v)
        return c

    assert not cfg().split_cores()                                   # k=0: phases take turns on every core
    assert cfg(train__max_staleness=1).split_cores()                 # k=1: they overlap on their own cores
    assert not cfg(train__max_staleness=1, placement__cpu_split="shared").split_cores()
    assert cfg(placement__cpu_split="disjoint").split_cores()
    assert not cfg(train__max_staleness=1, placement__gpus_per_node=8).split_cores()  # GPUs: nothing to split
    assert not RunConfig(mode="sft", placement={"cpu_split": "disjoint"}).split_cores()


def test_pin_moves_every_thread_of_the_process():
    import os
    import threading

    from rlhf_system.distributed.threads import pin

    before = os.sched_getaffinity(0)
    stop = threading.Event()
    seen = {}

    def worker():
        stop.wait(5)
        seen["cores"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker)
    t.start()  # started BEFORE pinning: Linux pins per thread, so pin must reach it too
    try:
        pin([min(before)])
        stop.set()
        t.join(5)
        assert seen["cores"] == {min(before)} and os.sched_getaffinity(0) == {min(before)}
    finally:
        stop.set()
        pin(sorted(before))
    assert os.sched_getaffinity(0) == before


def test_parse_cores_reads_every_bind_form():
    from rlhf_system.distributed.threads import parse_cores

    assert parse_cores("0,1,2,3|4,5,6,7") == list(range(8))
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cores("1") == [1]
