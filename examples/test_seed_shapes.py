"""The seed document's first example, as a test.

The seed saves the hidden state of GPT-2 block 5 and the attention output of block 3 on
"The capital of France" and prints their shapes. Here the layers are picked by depth (5/12 and
3/12 of the way down), so the same test runs on GPT-2 and on the 2-layer bundled model, and the
shapes are asserted instead of printed.

The seed reads `model.transformer.h[5].output[0]`. Under transformers 4 a GPT-2 block returns a
tuple and `[0]` is the hidden states; under transformers 5 it returns the tensor itself and `[0]`
is batch row 0 (hazard H1 in the notes). `hidden_states()` below reads the hidden states either way.
"""

import pytest
import torch

PROMPT = "The capital of France"


def hidden_states(output):
    """A block's hidden states whether the block returns a tuple (transformers 4) or a tensor (5)."""
    return output[0] if isinstance(output, tuple) else output


def layers_by_depth(model):
    n = model.config.n_layer
    return int(n * 3 / 12), int(n * 5 / 12)  # GPT-2 (12 layers): 3 and 5, as in the seed


@pytest.mark.nnsight_models("bundled:capitals", "gpt2")
def test_hidden_and_attention_shapes(model):
    attn_layer, hidden_layer = layers_by_depth(model)
    seq = len(model.tokenizer(PROMPT)["input_ids"])
    d_model = model.config.n_embd
    with torch.inference_mode():
        with model.trace(PROMPT):
            # modules are read in execution order: block 3's attention runs before block 5's output
            attn = model.transformer.h[attn_layer].attn.output[0].save()
            hidden = hidden_states(model.transformer.h[hidden_layer].output).save()
    assert hidden.shape == (1, seq, d_model)
    assert attn.shape == (1, seq, d_model)


@pytest.mark.nnsight_models("bundled:capitals", "gpt2")
def test_seed_idiom_changed_meaning_under_transformers_5(model):
    """Documents hazard H1: the seed's literal `.output[0]` is the hidden states only on transformers 4."""
    import transformers

    _, hidden_layer = layers_by_depth(model)
    seq = len(model.tokenizer(PROMPT)["input_ids"])
    with torch.inference_mode():
        with model.trace(PROMPT):
            literal = model.transformer.h[hidden_layer].output[0].save()
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert literal.shape == (seq, model.config.n_embd)  # batch row 0, not [1, seq, d_model]
    else:
        assert literal.shape == (1, seq, model.config.n_embd)
