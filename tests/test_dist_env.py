"""Slurm's variables mapped to the ones torch.distributed reads."""

from alora_ds.dist import first_slurm_host, slurm_environment


def test_first_host_of_a_nodelist():
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a[3,5]") == "a3"
    assert first_slurm_host("localhost") == "localhost"


def test_slurm_variables_fill_the_missing_ones():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
           "SLURM_JOB_NODELIST": "n[2-3]", "SLURM_JOB_ID": "77"}  # fmt: skip
    assert slurm_environment(env) == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n2", "MASTER_PORT": "20077",
    }  # fmt: skip
    # A launcher that already set RANK wins; no Slurm, nothing to map.
    assert slurm_environment({**env, "RANK": "0"}) == {}
    assert slurm_environment({}) == {}
    assert slurm_environment({**env, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
