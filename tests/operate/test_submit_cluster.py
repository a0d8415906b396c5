"""``drpo submit`` against what the cluster says (stand-in ``sinfo`` / ``sbatch`` on PATH; the
real round trip is tests/operate/test_slurm_local.py):

* ``--cpus-per-task`` defaults to the fewest CPUs of a node; a value above every node's CPUs (the
  job would pend forever) and 0 are refused;
* without a readable cluster the default is refused with what to pass, and SLURM's "no
  configuration" errors say that SLURM_CONF is missing;
* a real submission writes the script and the resolved config; ``--dry-run`` writes nothing
  (tests/operate/test_submit.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from drpo_megatron.config import load_config
from drpo_megatron.operate.submit import main

ROOT = Path(__file__).resolve().parents[2]
NO_CONFIG = "sinfo: fatal: Could not establish a configuration source"


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A config (output under tmp_path) and stand-ins: ``sinfo`` lists nodes of 2 and 4 CPUs
    (or fails as SLURM does without a configuration), ``sbatch`` records its script."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    state = {"sinfo": "printf '2\\n4\\n4\\n'", "sbatch": 'echo "$2" > "$CALLS"; echo "123;c"'}

    def write():
        for name, body in state.items():
            (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
            (bin_ / name).chmod(0o755)

    write()
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    monkeypatch.setenv("CALLS", str(tmp_path / "sbatch-calls"))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((ROOT / "model_configs/deepseek_r1_distill_qwen_1_5b_bf16.yaml").read_text()
                   .replace("output_dir: runs/", f"output_dir: {tmp_path}/"))
    run = Path(load_config(cfg).output_dir)

    def set_(**bodies):
        state.update(bodies)
        write()

    return cfg, run, set_


def _submit(cfg, *extra):
    return main([str(cfg), "--nodes", "1", "--rollout-nodes", "0", *extra])


def test_cpus_per_task_defaults_to_the_smallest_node(cluster, capsys):
    cfg, run, _ = cluster
    assert _submit(cfg) == 0
    assert "submitted job 123" in capsys.readouterr().out
    script = next((run / "submit").glob("*.sbatch"))
    assert "#SBATCH --cpus-per-task=2\n" in script.read_text()
    assert (run / "submit" / "config.yaml").is_file()
    assert Path(cluster[0].parent / "sbatch-calls").read_text().strip() == str(script)


@pytest.mark.parametrize("cpus,match", [
    ("8", r"--cpus-per-task=8 exceeds the CPUs of every node \(at most 4\): the job would "
          r"pend forever; pass --cpus-per-task 2 or fewer"),
    ("0", r"--cpus-per-task=0 must be >= 1"),
    ("-3", r"--cpus-per-task=-3 must be >= 1"),
])
def test_bad_cpus_per_task_is_refused_before_anything_is_written(cluster, capsys, cpus, match):
    cfg, run, _ = cluster
    assert _submit(cfg, "--cpus-per-task", cpus) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drpo submit: error: ")
    assert __import__("re").search(match, err[0]), err[0]
    assert not run.exists()


def test_without_slurm_configuration_the_error_names_slurm_conf(cluster, capsys):
    cfg, run, set_ = cluster
    set_(sinfo=f"echo '{NO_CONFIG}' >&2; exit 1",
         sbatch="echo 'sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host'"
                " >&2; echo 'sbatch: fatal: Could not establish a configuration source' >&2; exit 1")
    assert _submit(cfg) == 2  # the default needs the cluster
    err = capsys.readouterr().err
    assert "--cpus-per-task not given and the CPUs per node could not be read" in err
    assert "SLURM_CONF is not set" in err and "pass --cpus-per-task N" in err
    assert not run.exists()
    assert _submit(cfg, "--cpus-per-task", "2") == 1  # given: sbatch is asked, and says why not
    err = capsys.readouterr().err
    assert "sbatch found no SLURM cluster configuration: SLURM_CONF is not set" in err
    assert "set SLURM_CONF to its slurm.conf" in err


def test_dry_run_without_a_cluster(cluster, capsys):
    cfg, run, set_ = cluster
    set_(sinfo=f"echo '{NO_CONFIG}' >&2; exit 1")
    assert _submit(cfg, "--dry-run", "--cpus-per-task", "2") == 0
    assert "#SBATCH --cpus-per-task=2" in capsys.readouterr().out
    assert not run.exists()
