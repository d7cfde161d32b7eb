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
