"""``drpo plan`` counts the frozen reference policy of ``loss.kl``: one more set of weights in
the model dtype, no gradients or optimizer state."""

from drpo_megatron.config import load_config
from drpo_megatron.operate.plan import GIB, make_plan

DENSE_ARCH = dict(architecture="Qwen3ForCausalLM", hidden_size=8, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=16,
                  intermediate_size=16)  # 1568 parameters (tests/operate/test_plan.py)


def _plan(kl: dict):
    return make_plan(load_config(None, {"model": {"dtype": "bf16", "arch": DENSE_ARCH},
                                        "parallel": {"micro_batch_size": 1},
                                        "loss": {"kl": kl}}))


def test_reference_weights_are_counted_once_in_the_model_dtype():
    off, on = _plan({}), _plan({"coef": 0.01})
    assert round(off.weights_gib * GIB) == 1568 * 2
    assert round(on.weights_gib * GIB) == 2 * 1568 * 2  # + the reference in bf16
    assert (on.grads_gib, on.optimizer_gib, on.activations_gib) == \
        (off.grads_gib, off.optimizer_gib, off.activations_gib)
    assert on.total_gib - off.total_gib == 1568 * 2 / GIB
