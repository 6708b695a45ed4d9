"""Helpers for testing findings and the plugin itself without a model hub.

`tiny_gpt2` builds a seeded random GPT-2 and a word-level tokenizer, identical on every machine.
"""

from __future__ import annotations

from typing import Any, Sequence

DEFAULT_WORDS = (
    "The capital of France Germany Italy Spain is Paris Berlin Rome Madrid city a an and in the of to "
    "When Mary John went store gave drink"
).split()


def word_tokenizer(words: Sequence[str] = DEFAULT_WORDS, *, bos: bool = True, token_type_ids: bool = False) -> Any:
    """A word-level fast tokenizer over `words` (plus <pad>=0, <bos>=1, <unk>=2), built locally.

    `token_type_ids=True` makes it emit token_type_ids the way a locally built GPT-2 tokenizer does
    under transformers 4.57 (hazard H7), to test that the plugin drops them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<bos>", "<unk>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    hf.model_input_names = ["input_ids", "token_type_ids", "attention_mask"] if token_type_ids else ["input_ids", "attention_mask"]
    return hf


def tiny_gpt2(*, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4, words: Sequence[str] = DEFAULT_WORDS, **config: Any) -> tuple[Any, Any]:
    """A seeded random GPT2LMHeadModel and its word tokenizer: same weights on transformers 4.57 and 5.x."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer(words)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    return model, tok
