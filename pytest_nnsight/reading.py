"""Reading sites: the activations of named sites for a prompt, with no module paths and no `.output[0]`.

>>> acts = read(model, "The capital of France is", ["resid_post.1", "attn_out.0"])   # doctest: +SKIP
>>> acts["resid_post.1"].shape                                                      # doctest: +SKIP
torch.Size([1, 6, 64])
"""

from __future__ import annotations

from typing import Any

import torch

from .batching import encode, groups, mixed_lengths_ok
from .errors import PositionError, SiteError
from .metrics import Metric
from .prompts import check_context, resolve_position, show_tokens, slots_of, text_of, tokens_of
from .sites import resolve_sites
from .trace import run


def read(model: Any, prompt: Any, sites: Any, *, positions: Any = None) -> dict[str, torch.Tensor]:
    """The activations at `sites` for `prompt`: {site label: tensor [batch, seq, d]}, detached clones on the model's device.

    `prompt` is a str, a `Prompt` or a list of them (the batch). `sites` is anything `sweep(sites=)` takes: a
    vocabulary name ('resid_post.3', 'head_out.1.2', 'embed'), a group ('resid_post', 'attn_out', ...), a Site, an
    envoy, a path, or a list of these. `positions`: None for every token (prompts of one token length), else
    anything `patch(position=)` takes, resolved in each prompt, so `seq` is the number of positions named.
    Keys are the site labels, in the order given. Attention patterns ('pattern.L') are read whole: no positions.
    """
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    if not prompts:
        raise PositionError("read() got an empty list of prompts: give a prompt or a list of them")
    site_list = list(dict.fromkeys(resolve_sites(model, sites)))
    texts = [text_of(p) for p in prompts]
    token_lists = [tokens_of(model, t) for t in texts]
    for tokens, text in zip(token_lists, texts):
        check_context(model, tokens, text)
    if positions is None:
        if len({len(t) for t in token_lists}) > 1:
            shown = "\n".join(f"  [{show_tokens(t)}]" for t in token_lists)
            raise PositionError(
                f"read() got prompts of different token lengths ({', '.join(str(len(t)) for t in token_lists)}) and positions=None, "
                f"so their tokens do not line up: pass positions= (e.g. 'last') to read the same tokens of each\n{shown}"
            )
        wanted = [list(range(len(t))) for t in token_lists]
    else:
        if any(s.item == 1 for s in site_list):
            raise SiteError("attention pattern sites are read whole: pass positions=None to read them")
        wanted = [
            resolve_position(t, positions, prompt=text, slots=slots_of(p))
            for t, text, p in zip(token_lists, texts, prompts)
        ]
        if len({len(w) for w in wanted}) > 1:
            raise PositionError(
                f"positions={positions!r} names {', '.join(str(len(w)) for w in wanted)} tokens in the prompts: read() needs the same count in each"
            )
    rows: dict[Any, list[Any]] = {s: [None] * len(texts) for s in site_list}
    for idx in groups([len(t) for t in token_lists], len(texts), mixed=mixed_lengths_ok(model)):
        chunk = [texts[i] for i in idx]
        batch = encode(model, chunk)
        nothing = Metric("none", lambda out, ref, k=len(chunk): torch.zeros(k))
        _, acts = run(model, chunk, nothing, save=site_list)
        for r, i in enumerate(idx):
            for s in site_list:
                rows[s][i] = acts[s][r] if s.item == 1 else acts[s][r, batch.padded(r, wanted[i])]
    return {str(s): torch.stack(rows[s]) for s in site_list}
