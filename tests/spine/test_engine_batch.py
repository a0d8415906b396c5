"""Parsing SGLang /generate outputs (malformed ones fail loudly) and micro-batch packing."""

import math

import pytest

from drpo_megatron.rollout.engine import Sample, parse_sample, rollout_metrics
from drpo_megatron.rollout.server import ServerError
from drpo_megatron.models.megatron_model import causal_attention_mask
from drpo_megatron.training.batch import pack_samples


def _out(ids, lps, **meta):
    return {"text": "x", "output_ids": ids,
            "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)],
                          "finish_reason": {"type": "stop"}, "weight_version": "3", **meta}}


def test_parse_ok():
    s = parse_sample(_out([5, 6, 2], [-0.1, -0.2, -0.3]), group_id=1, prompt_ids=[1, 2],
                     answer="7", server_name="s")
    assert s.response_ids == [5, 6, 2] and s.rollout_logp == [-0.1, -0.2, -0.3]
    assert s.weight_version == "3" and s.finish_reason == "stop" and s.answer == "7"


@pytest.mark.parametrize("bad,match", [
    ([1, 2], "expected a JSON object"),
    ({"text": "x"}, "lacks 'output_ids' or 'meta_info'"),
    ({"output_ids": [1], "meta_info": {}}, "lacks meta_info.output_token_logprobs"),
    ({"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [[-0.1, 1, None]]}},
     "2 output_ids but 1 log-probs"),
    ({"output_ids": [1], "meta_info": {"output_token_logprobs": [[-0.1, 9, None]]}},
     "does not match token 1"),
])
def test_parse_malformed(bad, match):
    with pytest.raises(ServerError, match=match):
        parse_sample(bad, group_id=0, prompt_ids=[1], answer="", server_name="s")


def test_null_logprob_becomes_nan_and_is_counted():
    s = parse_sample(_out([5, 6], [None, -0.2]), group_id=0, prompt_ids=[1], answer="",
                     server_name="s")
    assert math.isnan(s.rollout_logp[0])
    m = rollout_metrics([s], current_version="4")
    assert m["rollout/nonfinite_logprob_tokens"] == 1.0
    assert m["rollout/staleness"] == 1.0


def _sample(p, r, adv=0.5):
    return Sample(group_id=0, prompt_ids=p, response_ids=r, rollout_logp=[-float(t) for t in r],
                  text="", finish_reason="stop", weight_version="0", advantage=adv)


def test_pack_samples_alignment():
    a = _sample([1, 2, 3], [7, 8])
    b = _sample([4], [9, 10, 11], adv=-1.0)
    mb = pack_samples([a, b], pad_id=0, first_seq_id=10)
    assert mb.tokens.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    # logits at position j predict token j+1: response targets sit where loss_mask is True
    assert mb.targets[mb.loss_mask].tolist() == [7, 8, 9, 10, 11]
    assert mb.rollout_logp[mb.loss_mask].tolist() == [-7, -8, -9, -10, -11]
    assert mb.advantages[mb.loss_mask].tolist() == [0.5, 0.5, -1.0, -1.0, -1.0]
    assert mb.seq_ids[mb.loss_mask].tolist() == [10, 10, 11, 11, 11]
    assert mb.num_tokens == 5 and mb.num_seqs == 2
    with pytest.raises(ValueError, match="does not fit seq_len=3"):
        pack_samples([a], pad_id=0, seq_len=3)


def test_causal_mask_convention():
    m = causal_attention_mask(3)[0, 0]
    assert m.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_server_env_drops_trainer_torchrun_variables():
    from drpo_megatron.rollout.server import server_base_env

    env = server_base_env({"PATH": "/bin", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h",
                           "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
                           "TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
