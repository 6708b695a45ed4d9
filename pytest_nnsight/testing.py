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
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.model_input_names = (
        ["input_ids", "token_type_ids", "attention_mask"] if token_type_ids else ["input_ids", "attention_mask"]
    )
    return hf


def tiny_gpt2(
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    words: Sequence[str] = DEFAULT_WORDS,
    **config: Any,
) -> tuple[Any, Any]:
    """A seeded random GPT2LMHeadModel and its word tokenizer: same weights on transformers 4.57 and 5.x."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer(words)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **config,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    return model, tok


def check_snapshot_lifecycle(
    pytester: Any, source: str, *, module: str = "test_finding", args: Sequence[str] = (), delta: float = 1.0
) -> list[str]:
    """Walk a test using `finding_snapshot` through fail -> record -> pass -> drift -> fail -> update -> pass.

    `source` is one test module with one snapshot assertion. The environment change is simulated by
    editing the recorded torch version, the moved finding by adding `delta` to every stored number.
    Returns the stages checked; a stage that behaves otherwise fails the calling test.

    >>> def test_my_snapshot_plugin_setup(pytester):                   # doctest: +SKIP
    ...     check_snapshot_lifecycle(pytester, "def test_x(finding_snapshot): assert [1.0] == finding_snapshot")
    """
    __tracebackhide__ = True
    import json

    from .snapshots.encode import dumps

    def run(*extra: str) -> Any:
        import pytest

        with pytest.MonkeyPatch.context() as mp:  # inner runs under `pytest -n` are not xdist workers
            for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_TESTRUNUID", "PYTEST_XDIST_WORKER_COUNT"):
                mp.delenv(name, raising=False)
            return pytester.runpytest(*args, *extra)

    def files() -> list[Any]:
        return sorted((pytester.path / "__snapshots__" / module).glob("*.json"))

    def edit(change: Any) -> None:
        for path in files():
            rec = json.loads(path.read_text())
            change(rec)
            path.write_text(dumps(rec))

    def shift(x: Any) -> Any:
        if isinstance(x, float):
            return x + delta
        if isinstance(x, list):
            return [shift(v) for v in x]
        if isinstance(x, dict):
            return {k: shift(v) for k, v in x.items()}
        return x

    pytester.makepyfile(**{module: source})
    run().assert_outcomes(failed=1)
    run("--snapshot-update").assert_outcomes(passed=1)
    assert files(), f"--snapshot-update wrote no findings snapshot under __snapshots__/{module}"
    run().assert_outcomes(passed=1)
    edit(lambda rec: rec["environment"].update(torch="0.0.0-old"))
    result = run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*re-verified under a new environment: torch 0.0.0-old -> *"])
    edit(lambda rec: rec.update(finding=shift(rec["finding"])))
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*this finding drifted after torch 0.0.0-old -> *--snapshot-update accepts it*",
            "*cells moved beyond tolerance*",
        ]
    )
    run("--snapshot-update").assert_outcomes(passed=1)
    result = run()
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*re-verified*")
    return ["fail (not recorded)", "record", "pass", "re-verified after an upgrade", "drift fails", "update", "pass"]


TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gptj", "bert")


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    n_layer: int = 2,
    d_model: int = 32,
    n_head: int = 4,
    words: Sequence[str] = DEFAULT_WORDS,
) -> tuple[Any, Any]:
    """A seeded random model of `family` (one of TINY_FAMILIES) and its word tokenizer, built from a transformers config.

    Decoders come with their LM head; 'bert' is a bare BertModel (an encoder, like MiniLM). Llama-style
    models use grouped-query attention (n_head // 2 key/value heads) so per-head sites see it.

    >>> model, tok = tiny_model("llama")          # doctest: +SKIP
    """
    import torch
    import transformers as t

    if family == "gpt2":
        return tiny_gpt2(seed=seed, n_layer=n_layer, n_embd=d_model, n_head=n_head, words=words)
    tok = word_tokenizer(words)
    ids = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=1, pad_token_id=0)
    llama_like = dict(
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=max(1, n_head // 2),
        max_position_embeddings=64,
        **ids,
    )
    builders = {
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(
            t.GPTNeoXConfig(
                hidden_size=d_model,
                intermediate_size=2 * d_model,
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                max_position_embeddings=64,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                **ids,
            )
        ),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama_like)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**llama_like)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like)),
        "gptj": lambda: t.GPTJForCausalLM(
            t.GPTJConfig(
                n_embd=d_model,
                n_layer=n_layer,
                n_head=n_head,
                rotary_dim=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
        ),
        "bert": lambda: t.BertModel(
            t.BertConfig(
                hidden_size=d_model,
                intermediate_size=2 * d_model,
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                max_position_embeddings=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                pad_token_id=0,
                vocab_size=len(tok),
            ),
            add_pooling_layer=False,
        ),
    }
    if family not in builders:
        from .errors import ArgumentError

        raise ArgumentError(f"tiny_model family {family!r}: expected one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    model = builders[family]()
    model.eval()
    return model, tok


def wordpiece_tokenizer(
    words: Sequence[str] = DEFAULT_WORDS, *, padding_side: str = "right", lowercase: bool = True
) -> Any:
    """A BERT-style WordPiece fast tokenizer built locally: [CLS] ... [SEP], uncased by default (like MiniLM's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *((w.lower() if lowercase else w) for w in words)]))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    hf.padding_side = padding_side
    return hf


def tiny_bert(
    *,
    seed: int = 0,
    n_layer: int = 2,
    d_model: int = 32,
    n_head: int = 4,
    words: Sequence[str] = DEFAULT_WORDS,
    padding_side: str = "right",
) -> tuple[Any, Any]:
    """A seeded random BertModel (an encoder like MiniLM, absolute positions) and an uncased WordPiece tokenizer, built locally.

    >>> model, tok = tiny_bert(padding_side="left")          # doctest: +SKIP
    """
    import torch
    import transformers as t

    tok = wordpiece_tokenizer(words, padding_side=padding_side)
    cfg = t.BertConfig(
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        vocab_size=len(tok),
    )
    torch.manual_seed(seed)
    model = t.BertModel(cfg, add_pooling_layer=False)
    model.eval()
    return model, tok
