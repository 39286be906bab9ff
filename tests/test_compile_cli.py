"""`alignjax compile` builds the real sharded train step for a TPU topology and says whether it fits."""

import pytest

from alignjax.aot import libtpu_available
from alignjax.cli import main as cli_main

pytestmark = [pytest.mark.slow,  # each compiles a 7B-70B sharded step for a TPU topology
              pytest.mark.skipif(not libtpu_available(),
                                 reason='libtpu (TPU compiler) not installed: pip install -e ".[tpu]"')]


def test_llama2_7b_fits_v5p_64(capsys):
    cli_main(["compile", "--config", "configs/sft.py:llama2_7b", "--topology", "v5p-64"])
    out = capsys.readouterr().out
    assert "FITS" in out and "DOES NOT FIT" not in out
    assert "GiB" in out


def test_oversized_does_not_fit(capsys):
    # Pure data parallelism: every v5e chip would hold all 7B float32 weights plus Adam state.
    with pytest.raises(SystemExit) as e:
        cli_main(["compile", "--config", "configs/sft.py:llama2_7b", "--topology", "v5e-8",
                  "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.train.batch_size=8",
                  "--config.train.grad_accum_steps=1",
                  "--config.data.seq_len=512"])
    assert e.value.code == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_tr_dpo_step_compiles_with_the_reference_in_the_state(capsys):
    cli_main(["compile", "--config", "configs/dpo.py:tiny", "--topology", "v5p-8",
              "--config.dpo.ref_refresh_every=4"])
    assert "FITS" in capsys.readouterr().out


def test_reward_step_compiles(capsys):
    cli_main(["compile", "--config", "configs/reward.py:tiny", "--topology", "v5p-8"])
    assert "FITS" in capsys.readouterr().out


@pytest.mark.parametrize("algorithm, models", [("grpo", "policy"), ("ppo", "policy, value, reference, reward")])
def test_online_rl_update_and_rollout_compile(capsys, algorithm, models):
    """The update step and the rollout program of GRPO (toy reward, beta 0: the policy alone) and
    PPO (ppo.reward empty: a reward model of the policy's size is resident beside the step)."""
    cli_main(["compile", "--config", f"configs/{algorithm}.py:tiny", "--topology", "v5p-8",
              "--config.tokenizer.path=toy"] + (["--config.ppo.reward="] if algorithm == "ppo" else []))
    out, err = capsys.readouterr()
    assert f"model(s): {models};" in err
    assert out.count("FITS") == 2 and "update step: AOT" in out and "rollout (sampling + scoring): AOT" in out
