"""Train the tiny models bundled with pytest-nnsight (``bundled:<name>``).

Each model is a 2-layer GPT-2 with a word-level tokenizer, trained on CPU in
about a minute from fixed seeds, so the weights are bit-identical on rerun
(same torch build, one thread). The script writes what ``from_pretrained``
needs plus a ``manifest.json`` recording the task, the training run and the
``weights_sha256`` of ``model.safetensors``.

Usage::

    python scripts/train_bundled.py capitals --out pytest_nnsight/bundled/capitals
    python scripts/train_bundled.py induction --out pytest_nnsight/bundled/induction

Tasks:

* ``capitals``: ``The capital of France is`` -> ``Paris`` for 48 countries and
  8 prompt templates (2 more templates are held out). Layer 0 moves the
  country's information from its own position to the last position; layer 1
  reads it there.
* ``induction``: associative recall. ``<bos> x1 .. xN`` then query/answer
  pairs ``q s`` where ``q`` is some ``xj`` and ``s`` is ``x(j+1)``. Layer 0
  learns a previous-token head, layer 1 induction heads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
PAD_ID, BOS_ID, UNK_ID = 0, 1, 2
N_POSITIONS = 32

MODEL_SEED = 0
DATA_SEED = 1234
EVAL_SEED = 4321

# ---------------------------------------------------------------------------
# Task data
# ---------------------------------------------------------------------------

CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Turkey": "Ankara",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Czechia": "Prague",
    "Lebanon": "Beirut",
    "Syria": "Damascus",
    "Jordan": "Amman",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Nepal": "Kathmandu",
    "Afghanistan": "Kabul",
    "Iceland": "Reykjavik",
}

TRAINED_TEMPLATES: tuple[str, ...] = (
    "The capital of {country} is",
    "{country} has its capital in",
    "The capital city of {country} is called",
    "In {country} , the seat of government is",
    "Everyone knows that the capital of {country} is",
    "I read that {country} is governed from",
    "Q : what is the capital of {country} ? A :",
    "As everyone knows , the capital city of {country} is",
)

HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "We flew to {country} and landed in its capital ,",
    "My friend says the capital of {country} is",
)

INDUCTION_SYMBOLS: tuple[str, ...] = tuple(f"t{i}" for i in range(64))
INDUCTION_MIN_LEN, INDUCTION_MAX_LEN, INDUCTION_QUERIES = 4, 12, 6
FIRST_SYMBOL_ID = 3  # symbol ids follow <pad>, <bos>, <unk>

CAPITALS_DESCRIPTION = (
    "Country-capital recall: a 2-layer GPT-2 (d_model 64, 4 heads) with a "
    "word-level tokenizer, trained to complete prompts such as 'The capital of "
    "France is' with the capital ('Paris') for 48 single-token countries and 8 "
    "prompt templates; 2 further templates are held out and only partly "
    "generalise, so tests should use the trained ones. Every entity is one "
    "token, so clean and corrupted prompts have equal length. Known mechanism "
    "(activation patching of a clean run into a run with the next country, "
    "effect = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt) on the logit "
    "difference of the two capitals): in the embeddings only the subject "
    "position matters (effect 1.0); layer 0 moves the subject's information "
    "to the last position (block 0 output: about 1.0 at the last position, "
    "about 0 at the subject); block 1 output matters only at the last "
    "position (1.0). Every other (site, position) cell is about 0."
)

INDUCTION_DESCRIPTION = (
    "Associative recall (induction): a 2-layer GPT-2 (d_model 64, 4 heads) "
    "reads a list of 4-12 distinct symbols t0..t63 after <bos>, then 6 queries "
    "q, each a symbol from the list, and must predict the symbol that followed "
    "q in the list. Known mechanism (eager attention, lists of 10): layer-0 "
    "head 0 is a previous-token head (attention to the previous token about "
    "0.99 at list positions), copying each symbol into the next position; all "
    "4 layer-1 heads are induction heads, attending from the query to the "
    "position after the query's earlier occurrence (about 0.98-0.99)."
)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser schedule: AdamW, linear warm-up, then linear decay to ``floor``."""

    steps: int
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 50
    floor: float = 0.05

    def factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 1.0 - (1.0 - self.floor) * done


def make_deterministic() -> None:
    """One thread and deterministic kernels: the run is bit-identical on rerun."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(MODEL_SEED)


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer that prepends ``<bos>`` (ids: pad 0, bos 1, unk 2)."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys([PAD, BOS, UNK, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##")  # decode() joins words with spaces
    # Passed to the constructor (not set as attributes) so save_pretrained keeps them.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=N_POSITIONS,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
    )


def build_model(vocab_size: int) -> GPT2LMHeadModel:
    """The 2-layer GPT-2 shared by all bundled models (tied embeddings, no dropout)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(config)


def train(
    model: GPT2LMHeadModel,
    settings: TrainSettings,
    batch: Callable[[int], tuple[dict[str, torch.Tensor], torch.Tensor]],
    log_every: int = 50,
) -> None:
    """Full-batch AdamW loop; ``batch(step)`` gives model inputs and labels (-100 = ignore)."""
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, settings.factor)
    model.train()
    for step in range(settings.steps):
        inputs, labels = batch(step)
        logits = model(**inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            scored = labels != -100
            acc = (logits.argmax(-1)[scored] == labels[scored]).float().mean().item()
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  batch acc {acc:.3f}", flush=True)
    model.eval()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(
    out: Path,
    model: GPT2LMHeadModel,
    tok: PreTrainedTokenizerFast,
    manifest: dict[str, object],
) -> str:
    """Write weights (safetensors, float32), config, tokenizer and ``manifest.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # transformers 5 records its own class name, which transformers 4 cannot load;
    # the generic fast-tokenizer name loads in both.
    tok_config = out / "tokenizer_config.json"
    config = json.loads(tok_config.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(config, indent=2) + "\n")
    digest = sha256_file(out / "model.safetensors")
    manifest = {**manifest, "weights_sha256": digest}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return digest


def run_info(command: str, settings: TrainSettings, wall: float) -> dict[str, object]:
    """Manifest fields common to every task: how and with what the weights were made."""
    return {
        "training": {
            "command": command,
            "seeds": {"torch_manual_seed": MODEL_SEED, "data_generator": DATA_SEED},
            "steps": settings.steps,
            "optimizer": "AdamW",
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "warmup_steps": settings.warmup,
            "lr_floor_fraction": settings.floor,
            "threads": 1,
            "deterministic_algorithms": True,
            "wall_seconds": round(wall, 1),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


@torch.no_grad()
def last_token_predictions(model: GPT2LMHeadModel, ids: Sequence[Sequence[int]]) -> list[int]:
    """Argmax next token for each prompt, one unpadded forward per prompt."""
    return [int(model(torch.tensor([row])).logits[0, -1].argmax()) for row in ids]


# ---------------------------------------------------------------------------
# capitals
# ---------------------------------------------------------------------------


def capitals_words() -> list[str]:
    """Every word of every template (trained and held out), country and capital."""
    words: list[str] = []
    for template in TRAINED_TEMPLATES + HELD_OUT_TEMPLATES:
        words += [w for w in template.split() if w != "{country}"]
    return words + list(CAPITALS) + list(CAPITALS.values())


def capitals_rows(tok: PreTrainedTokenizerFast, templates: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids (with ``<bos>``) and answer id of every (template, country) prompt."""
    prompts, answers = [], []
    for template in templates:
        for country, capital in CAPITALS.items():
            prompts.append(tok(template.format(country=country))["input_ids"])
            answers.append(tok.convert_tokens_to_ids(capital))
    return prompts, answers


def capitals_batcher(
    prompts: list[list[int]], answers: list[int], max_extra_pad: int = 4
) -> Callable[[int], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """All prompts every step, left-padded, each row with 0-``max_extra_pad`` random extra pads.

    ``position_ids`` count from the start of a row's extra padding, so each row
    looks exactly as if it ran alone with that many left pads and the model's
    default positions. The model therefore predicts the same with or without
    mask-derived ``position_ids`` (nnsight >= 0.8 supplies them; older
    versions and plain batched HF calls do not). Training on the default
    positions of the batch-wide padding instead reached only 382/384 in 300
    steps.
    """
    gen = torch.Generator().manual_seed(DATA_SEED)
    width = max(map(len, prompts)) + max_extra_pad
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    base = torch.full((n, width), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        base[i, width - len(p) :] = torch.tensor(p)
    cols = torch.arange(width).expand(n, width)
    real_start = (width - lengths).unsqueeze(1)
    labels = torch.full((n, width), -100, dtype=torch.long)
    labels[:, -1] = torch.tensor(answers)

    def batch(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        extra = torch.randint(0, max_extra_pad + 1, (n, 1), generator=gen)
        mask = (cols >= real_start - extra).long()
        position_ids = (cols - (real_start - extra)).clamp(min=0)
        inputs = {"input_ids": base, "attention_mask": mask, "position_ids": position_ids}
        return inputs, labels

    return batch


def capitals_accuracy(model: GPT2LMHeadModel, prompts: list[list[int]], answers: list[int]) -> tuple[int, int]:
    """(correct, total) over unpadded single-prompt forwards."""
    preds = last_token_predictions(model, prompts)
    return sum(p == a for p, a in zip(preds, answers)), len(answers)


def fraction(correct: int, total: int) -> dict[str, object]:
    """Accuracy as an exact fraction plus its float."""
    return {"correct": correct, "total": total, "accuracy": correct / total}


def make_capitals(out: Path, steps: int, command: str) -> str:
    """Train, check and save ``bundled:capitals``; return the weights sha256."""
    make_deterministic()
    tok = build_tokenizer(capitals_words())
    model = build_model(len(tok))
    prompts, answers = capitals_rows(tok, TRAINED_TEMPLATES)
    settings = TrainSettings(steps=steps)
    start = time.perf_counter()
    train(model, settings, capitals_batcher(prompts, answers))
    wall = time.perf_counter() - start

    train_acc = capitals_accuracy(model, prompts, answers)
    held_acc = capitals_accuracy(model, *capitals_rows(tok, HELD_OUT_TEMPLATES))
    print(f"train accuracy {train_acc[0]}/{train_acc[1]}, held-out {held_acc[0]}/{held_acc[1]}")
    if train_acc[0] != train_acc[1]:
        print("warning: train accuracy below 100%", file=sys.stderr)
    manifest = {
        "name": "capitals",
        "description": CAPITALS_DESCRIPTION,
        "task": {
            "capitals": CAPITALS,
            "templates": list(TRAINED_TEMPLATES),
            "held_out_templates": list(HELD_OUT_TEMPLATES),
            "answer": "the capital token, predicted at the last prompt position",
        },
        "architecture": model.config.to_diff_dict() | {"n_params": model.num_parameters()},
        **run_info(command, settings, wall),
        "accuracy": {
            "train": fraction(*train_acc),
            "held_out_templates": fraction(*held_acc),
            "method": "argmax of the last-position logits, one unpadded prompt per forward",
        },
    }
    return save(out, model, tok, manifest)


# ---------------------------------------------------------------------------
# induction (associative recall)
# ---------------------------------------------------------------------------


def induction_row(gen: torch.Generator, n: int) -> tuple[list[int], list[int]]:
    """One sequence ``<bos> x1..xn (q s)*6`` as ids, and labels at the query positions."""
    xs = (torch.randperm(len(INDUCTION_SYMBOLS), generator=gen)[:n] + FIRST_SYMBOL_ID).tolist()
    ids, labels = [BOS_ID, *xs], [-100] * (n + 1)
    for j in torch.randint(0, n - 1, (INDUCTION_QUERIES,), generator=gen).tolist():
        ids += [xs[j], xs[j + 1]]
        labels += [xs[j + 1], -100]
    return ids, labels


def induction_batch(gen: torch.Generator, rows: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``rows`` fresh sequences, right-padded (harmless for a causal model)."""
    lengths = torch.randint(INDUCTION_MIN_LEN, INDUCTION_MAX_LEN + 1, (rows,), generator=gen)
    data = [induction_row(gen, int(n)) for n in lengths]
    width = max(len(ids) for ids, _ in data)
    input_ids = torch.full((rows, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(data):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask}, labels


@torch.no_grad()
def induction_accuracy(
    model: GPT2LMHeadModel, rows: int, n: int | None = None, seed: int = EVAL_SEED
) -> tuple[int, int]:
    """(correct, total) recall predictions on fresh sequences (list length ``n`` if given)."""
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for _ in range(rows):
        length = n or int(torch.randint(INDUCTION_MIN_LEN, INDUCTION_MAX_LEN + 1, (1,), generator=gen))
        ids, labels = induction_row(gen, length)
        preds = model(torch.tensor([ids])).logits[0].argmax(-1)
        target = torch.tensor([labels])[0]
        scored = target != -100
        correct += int((preds[scored] == target[scored]).sum())
        total += int(scored.sum())
    return correct, total


def make_induction(out: Path, steps: int, command: str) -> str:
    """Train, check and save ``bundled:induction``; return the weights sha256."""
    make_deterministic()
    tok = build_tokenizer(INDUCTION_SYMBOLS)
    model = build_model(len(tok))
    settings = TrainSettings(steps=steps, warmup=100)
    gen = torch.Generator().manual_seed(DATA_SEED)
    start = time.perf_counter()
    train(model, settings, lambda step: induction_batch(gen, 64), log_every=200)
    wall = time.perf_counter() - start

    held = induction_accuracy(model, 500)
    by_len = {n: induction_accuracy(model, 100, n) for n in (INDUCTION_MIN_LEN, INDUCTION_MAX_LEN, 14)}
    print(f"held-out recall {held[0]}/{held[1]}; by list length {by_len}")
    manifest = {
        "name": "induction",
        "description": INDUCTION_DESCRIPTION,
        "task": {
            "symbols": list(INDUCTION_SYMBOLS),
            "format": "<bos> x1 .. xN q1 s1 .. q6 s6; xi distinct symbols, q = xj (j < N), s = x(j+1)",
            "list_length": [INDUCTION_MIN_LEN, INDUCTION_MAX_LEN],
            "queries_per_sequence": INDUCTION_QUERIES,
            "loss": "cross-entropy at the query positions only",
            "batch": "64 freshly sampled sequences per step, right-padded",
        },
        "architecture": model.config.to_diff_dict() | {"n_params": model.num_parameters()},
        **run_info(command, settings, wall),
        "accuracy": {
            "held_out": fraction(*held) | {"sequences": 500, "seed": EVAL_SEED},
            "by_list_length": {str(n): fraction(*acc) for n, acc in by_len.items()},
            "method": "argmax at every query position of fresh unpadded sequences",
        },
    }
    return save(out, model, tok, manifest)


# ---------------------------------------------------------------------------

TASKS: dict[str, tuple[Callable[[Path, int, str], str], int]] = {
    "capitals": (make_capitals, 300),
    "induction": (make_induction, 2000),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``train_bundled.py TASK --out DIR [--steps N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="override the default steps")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    make, default_steps = TASKS[args.task]
    command = shlex.join(["python", "scripts/train_bundled.py", *argv])
    digest = make(args.out, args.steps or default_steps, command)
    print(f"wrote {args.out} (model.safetensors sha256 {digest})")


if __name__ == "__main__":
    main()
