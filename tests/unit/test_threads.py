"""How many torch threads `shoal.init()` gives a worker, next to torchrun's OMP_NUM_THREADS=1."""

from __future__ import annotations

from shoal.runtime import choose_threads


def test_shoal_threads_wins():
    assert choose_threads({"SHOAL_THREADS": "3", "OMP_NUM_THREADS": "1"}, world=4, local_world=4, cpus=16) == 3


def test_the_launchers_default_of_one_is_replaced_by_the_cores_per_worker():
    defaulted = {"OMP_NUM_THREADS": "1", "SHOAL_THREADS_DEFAULTED": "1"}
    assert choose_threads(defaulted, world=4, local_world=4, cpus=16) == 4
    assert choose_threads({}, world=4, local_world=4, cpus=16) == 4


def test_an_omp_num_threads_the_user_set_is_kept():
    assert choose_threads({"OMP_NUM_THREADS": "2"}, world=4, local_world=4, cpus=16) == 0


def test_one_process_keeps_torchs_choice():
    assert choose_threads({}, world=1, local_world=1, cpus=16) == 0
