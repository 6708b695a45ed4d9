"""Independent re-computation of a patching finding with plain torch forward hooks, no nnsight.

A `FindingSpec` is a finding's whole setup (model id, clean and corrupt prompts, sites, token
positions, metric and its token ids, direction, normalisation) plus the numbers it gave when it
was recorded, stored as a small JSON file. `replay(spec)` loads the model with transformers alone,
pins the tokenizer as pytest-nnsight does (left padding, only input_ids/attention_mask), and
recomputes the effect with `register_forward_hook` / `register_forward_pre_hook`: this code path
never imports nnsight. After an upgrade, `diagnose(recorded, nnsight_now, replayed)` says what
moved: nnsight's number moved but the replay still gives the recorded one -> nnsight's tracing
changed; the replay moved with it -> the model's own numbers changed (transformers, torch, weights).

    python -m pytest_nnsight.replay [--check] [--json OUT] SPEC.json ...

replays each spec (with `--check` also recomputes it through nnsight) and exits 1 when anything moved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .environment import library_versions
from .errors import ReplayError
from .files import atomic_write

FORMAT = 1
QUANTITIES = ("source", "target", "intervened", "normalized")
METRIC_KINDS = {"logit_diff": 2, "prob": 1, "logprob": 1, "rank": 1, "kl_div": 0}
NORMALIZATION = "(intervened - target) / (source - target)"


@dataclass(frozen=True)
class SiteSpec:
    """A site as plain data: module path, 'output' or 'input', optional head (of n_heads), tuple item."""

    path: str
    part: str = "output"
    head: int | None = None
    n_heads: int | None = None
    item: int = 0
    label: str | None = None


@dataclass(frozen=True)
class FindingSpec:
    """One patching finding's setup and recorded numbers, serializable to a small JSON file."""

    name: str
    model: str
    clean: str
    corrupt: str
    sites: tuple[SiteSpec, ...]
    positions: tuple[int, ...]
    metric: str  # one of METRIC_KINDS
    metric_tokens: tuple[Any, ...] = ()  # as given: 'Paris' or an id
    metric_ids: tuple[int, ...] = ()
    direction: str = "clean->corrupt"
    normalization: str = NORMALIZATION
    tokens: tuple[str, ...] = ()  # the clean prompt's tokens when recorded
    recorded: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    tolerance: float = 1e-5
    test: str = ""  # the test that asserts this finding (nodeid), for the drift report

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_patch(
        cls,
        model: Any,
        clean: Any,
        corrupt: Any,
        *,
        site: Any,
        position: Any,
        metric: Any,
        direction: str = "clean->corrupt",
        name: str | None = None,
        test: str = "",
        effect: Any = None,
        tolerance: float = 1e-5,
    ) -> "FindingSpec":
        """The spec of `patch(model, clean, corrupt, site=, position=, metric=)`, with its numbers recorded.

        Runs the patch through nnsight unless its `effect` is given. Only built-in metrics
        (logit_diff, prob, logprob, rank, kl_div) and models loadable by id replay.

        >>> spec = FindingSpec.from_patch(model, "The capital of France is", "The capital of Germany is",  # doctest: +SKIP
        ...                               site="transformer.h.0", position="last", metric=logit_diff("Paris", "Berlin"))
        >>> spec.save("findings/block0_last.json")                                                        # doctest: +SKIP
        """
        from .interventions import patch
        from .metrics import MetricSpec, token_id
        from .prompts import pair_positions, text_of
        from .sites import model_name, module_of, resolve_site

        if not isinstance(metric, MetricSpec):
            raise ReplayError(
                f"metric {metric!r} cannot be replayed: expected a built-in metric ({', '.join(f'{k}(...)' for k in METRIC_KINDS)})"
            )
        kind = metric.name.split("(", 1)[0]
        if kind not in METRIC_KINDS:
            raise ReplayError(f"metric {metric.name!r} cannot be replayed: expected one of {', '.join(METRIC_KINDS)}")
        model_id = model_name(model)
        loadable = (
            model_id.startswith("bundled:") or os.path.isdir(model_id) or re.match(r"^[\w.-]+(/[\w.-]+)?$", model_id)
        )
        if (
            not loadable or model_id == type(module_of(model)).__name__
        ):  # a module served as an object has only its class name
            raise ReplayError(
                f"model {model_id!r} has no id transformers can load, so it cannot be replayed: serve it by hub id, path or bundled:NAME"
            )
        s = resolve_site(model, site)
        ct, _, pos = pair_positions(model, clean, corrupt, position)
        if effect is None:
            effect = patch(model, clean, corrupt, site=s, position=pos, metric=metric, direction=direction)
        ids = tuple(token_id(model.tokenizer, t) for t in metric.tokens)
        first = next(module_of(model).parameters())
        return cls(
            name=name or f"{s}@{','.join(map(str, pos))}",
            model=model_id,
            clean=text_of(clean),
            corrupt=text_of(corrupt),
            sites=(SiteSpec(s.path, s.part, s.head, s.n_heads, s.item, s.label),),
            positions=tuple(pos),
            metric=kind,
            metric_tokens=tuple(metric.tokens),
            metric_ids=ids,
            direction=direction,
            tokens=tuple(ct),
            recorded={q: float(getattr(effect, q)) for q in QUANTITIES},
            environment=library_versions(),
            dtype=str(first.dtype).replace("torch.", ""),
            tolerance=tolerance,
            test=test,
        )

    # -- files --------------------------------------------------------------------------------
    def to_json(self) -> str:
        data = {"format": FORMAT, **asdict(self)}
        data["recorded"] = {k: _encode(v) for k, v in self.recorded.items()}
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> "FindingSpec":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ReplayError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ReplayError(f"{source}: expected a JSON object with the finding's setup")
        fmt = data.pop("format", FORMAT)
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise ReplayError(f"{source}: format {fmt!r}: expected an integer (this pytest-nnsight writes {FORMAT})")
        if fmt > FORMAT:
            raise ReplayError(f"{source}: written by a newer pytest-nnsight (format > {FORMAT}); upgrade to read it")
        missing = [k for k in ("name", "model", "clean", "corrupt", "sites", "positions", "metric") if k not in data]
        if missing:
            raise ReplayError(f"{source}: missing key(s) {', '.join(missing)}")
        if data["metric"] not in METRIC_KINDS:
            raise ReplayError(f"{source}: metric {data['metric']!r}: expected one of {', '.join(METRIC_KINDS)}")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(data) - known)
        if extra:
            raise ReplayError(
                f"{source}: unknown key(s) {', '.join(extra)}: accepted keys are {', '.join(sorted(known))}"
            )
        fields = ", ".join(SiteSpec.__dataclass_fields__)
        sites = data["sites"] if isinstance(data["sites"], list) else [data["sites"]]
        try:
            data["sites"] = tuple(SiteSpec(**s) for s in sites)
        except TypeError:
            raise ReplayError(
                f"{source}: sites {data['sites']!r}: expected a list of objects with keys {fields}"
            ) from None
        positions = data["positions"]
        if not isinstance(positions, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions
        ):
            raise ReplayError(f"{source}: positions {positions!r}: expected a list of ints")
        for key in ("positions", "metric_tokens", "metric_ids", "tokens"):
            data[key] = tuple(data.get(key, ()))
        recorded = data.get("recorded", {})
        if not isinstance(recorded, dict):
            raise ReplayError(f"{source}: recorded {recorded!r}: expected an object of {', '.join(QUANTITIES)}")
        try:
            data["recorded"] = {k: _decode(v) for k, v in recorded.items()}
        except (TypeError, ValueError):
            raise ReplayError(
                f"{source}: recorded {recorded!r}: expected a number (or 'nan', 'inf') for each of {', '.join(QUANTITIES)}"
            ) from None
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec atomically (temp file in the same folder, then os.replace)."""
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FindingSpec":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReplayError(
                f"{path}: cannot read the finding spec ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}): expected a JSON file "
                "written by FindingSpec.save"
            ) from None
        return cls.from_json(text, str(path))


def _encode(x: float) -> Any:
    return x if math.isfinite(x) else str(x)


def _decode(x: Any) -> float:
    return float(x)


# -- replay: transformers and torch hooks only ----------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    """The effect recomputed by plain torch: the four quantities, the tokens seen, and how long it took."""

    values: dict[str, float]
    tokens: tuple[str, ...]
    seconds: float

    def max_diff(self, other: dict[str, float]) -> float:
        return max(abs(self.values[q] - other[q]) for q in QUANTITIES if q in other)


@lru_cache(maxsize=4)
def load_plain(model_id: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """The torch module and tokenizer of `model_id` from transformers alone, pinned as pytest-nnsight pins them."""
    import torch
    import transformers

    if model_id.startswith("bundled:"):
        from .bundled import verified_path

        source, local = str(verified_path(model_id)), True
    else:
        source, local = model_id, os.path.isdir(model_id) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    module = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=local)
    tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
    tok.model_input_names = ["input_ids", "attention_mask"]  # as models.wrap: no token_type_ids (H7)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    module = module.to(device=device, dtype=getattr(torch, dtype)).eval()
    return module, tok


def _hidden(value: Any, site: SiteSpec) -> Any:
    t = value[site.item] if isinstance(value, tuple) else value
    if site.head is not None:
        b, n, d = t.shape
        t = t.view(b, n, site.n_heads, d // site.n_heads)[:, :, site.head, :]
    return t


def _written(value: Any, site: SiteSpec, positions: Sequence[int], src: Any) -> Any:
    """A copy of `value` (tensor or tuple) with `src` [k, d] written at `positions` of row 0 of the site's tensor."""
    t = value[site.item] if isinstance(value, tuple) else value
    t = t.clone()
    view = t if site.head is None else t.view(t.shape[0], t.shape[1], site.n_heads, -1)[:, :, site.head, :]
    view[0, list(positions), :] = src.to(view.dtype)
    if isinstance(value, tuple):
        return value[: site.item] + (t,) + value[site.item + 1 :]
    return t


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else next(iter(kwargs.values()))


def _forward(
    module: Any,
    tok: Any,
    text: str,
    sites: Sequence[SiteSpec],
    *,
    capture: bool = False,
    write: dict | None = None,
    positions: Sequence[int] = (),
) -> tuple[Any, dict[int, Any]]:
    """One forward of `text`; returns (last-position logits [V] float32, captured site values [T, d] by site index)."""
    import torch

    captured: dict[int, Any] = {}
    handles = []
    for i, site in enumerate(sites):
        target = module.get_submodule(site.path) if site.path else module
        if site.part == "output":

            def hook(mod: Any, args: tuple, out: Any, i: int = i, site: SiteSpec = site) -> Any:
                if capture:
                    captured[i] = _hidden(out, site)[0].detach().clone()
                if write is not None and i in write:
                    return _written(out, site, positions, write[i])
                return None

            handles.append(target.register_forward_hook(hook))
        else:

            def pre(mod: Any, args: tuple, kwargs: dict, i: int = i, site: SiteSpec = site) -> Any:
                value = _first_input(args, kwargs)
                if capture:
                    captured[i] = _hidden(value, site)[0].detach().clone()
                if write is not None and i in write:
                    new = _written(value, site, positions, write[i])
                    if args:
                        return (new, *args[1:]), kwargs
                    key = next(iter(kwargs))
                    return args, {**kwargs, key: new}
                return None

            handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        enc = tok(text, return_tensors="pt")
        device = next(module.parameters()).device
        with torch.inference_mode():
            out = module(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, -1].float(), captured


def _metric(spec: FindingSpec, last: Any, reference: Any) -> float:
    ids = spec.metric_ids
    if spec.metric == "logit_diff":
        return float(last[ids[0]] - last[ids[1]])
    if spec.metric == "prob":
        return float(last.softmax(-1)[ids[0]])
    if spec.metric == "logprob":
        return float(last.log_softmax(-1)[ids[0]])
    if spec.metric == "rank":
        return float((last > last[ids[0]]).sum())
    logp, ref = last.log_softmax(-1), reference.log_softmax(-1)
    return float((ref.exp() * (ref - logp)).sum())


def replay(spec: FindingSpec, *, device: str = "cpu", model: Any = None, tokenizer: Any = None) -> ReplayResult:
    """Recompute the spec's patching effect with plain torch forward hooks on the transformers model (no nnsight).

    `model`/`tokenizer` default to a fresh load of `spec.model` (see `load_plain`).
    """
    start = time.perf_counter()
    if model is None:
        model, loaded_tok = load_plain(spec.model, device, spec.dtype)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ReplayError("replay(model=...) needs the tokenizer too: pass tokenizer=")
    tokens = tuple(tokenizer.convert_ids_to_tokens(tokenizer(spec.clean)["input_ids"]))
    if spec.tokens and tokens != tuple(spec.tokens):
        raise ReplayError(
            f"{spec.name}: the tokenizer changed: {spec.clean!r} is now {list(tokens)}, recorded as {list(spec.tokens)}"
        )
    for t, i in zip(spec.metric_tokens, spec.metric_ids):
        if isinstance(t, str) and tokenizer(t, add_special_tokens=False)["input_ids"] != [i]:
            raise ReplayError(f"{spec.name}: answer {t!r} no longer tokenizes to id {i}")
    source, target = (spec.clean, spec.corrupt) if spec.direction == "clean->corrupt" else (spec.corrupt, spec.clean)
    reference = None
    if spec.metric == "kl_div":
        reference, _ = _forward(model, tokenizer, spec.clean, ())
    src_last, acts = _forward(model, tokenizer, source, spec.sites, capture=True)
    tgt_last, _ = _forward(model, tokenizer, target, ())
    pos = list(spec.positions)
    write = {i: acts[i][pos] for i in range(len(spec.sites))}
    patched_last, _ = _forward(model, tokenizer, target, spec.sites, write=write, positions=pos)
    s, t, p = (_metric(spec, x, reference) for x in (src_last, tgt_last, patched_last))
    norm = (p - t) / (s - t) if s != t else math.nan
    return ReplayResult(
        {"source": s, "target": t, "intervened": p, "normalized": norm}, tokens, time.perf_counter() - start
    )


# -- through nnsight, and the verdict -------------------------------------------------------------


def compute_with_nnsight(spec: FindingSpec, model: Any) -> dict[str, float]:
    """The same effect through pytest-nnsight's own `patch` (nnsight) on a served model; single-site specs."""
    from . import metrics
    from .interventions import patch
    from .sites import Site

    if len(spec.sites) != 1:
        raise ReplayError(
            f"{spec.name}: patch() takes one site, the spec has {len(spec.sites)}; replay it with replay() only"
        )
    s = spec.sites[0]
    site = Site(s.path, s.part, s.head, s.n_heads, s.label, s.item)
    metric = getattr(metrics, spec.metric)(*spec.metric_tokens)
    effect = patch(
        model,
        spec.clean,
        spec.corrupt,
        site=site,
        position=list(spec.positions),
        metric=metric,
        direction=spec.direction,
    )
    return {q: float(getattr(effect, q)) for q in QUANTITIES}


def _close(a: dict[str, float], b: dict[str, float], atol: float, rtol: float) -> bool:
    return all(
        abs(a[q] - b[q]) <= atol + rtol * abs(b[q]) or (math.isnan(a[q]) and math.isnan(b[q]))
        for q in QUANTITIES
        if q in a and q in b
    )


def diagnose(
    recorded: dict[str, float],
    nnsight_now: dict[str, float] | None,
    replayed: dict[str, float],
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> tuple[str, str]:
    """(status, sentence): what moved since the finding was recorded, by nnsight's number and the plain-torch replay.

    stable; tracing-changed (nnsight moved, replay still gives the recorded numbers); model-changed
    (both moved, together); replay-differs (nnsight agrees, the replay does not); both-changed.
    """
    q = "normalized"
    r_ok = _close(replayed, recorded, atol, rtol)
    if nnsight_now is None:
        return (
            ("stable", "the replay gives the recorded numbers")
            if r_ok
            else (
                "model-changed",
                f"plain torch moved: {q} {recorded[q]:.6g} -> {replayed[q]:.6g}; the model's own numbers changed",
            )
        )
    n_ok = _close(nnsight_now, recorded, atol, rtol)
    if n_ok and r_ok:
        return "stable", "nnsight, the replay and the recorded numbers agree"
    if r_ok:
        return "tracing-changed", (
            f"nnsight's {q} moved ({recorded[q]:.6g} -> {nnsight_now[q]:.6g}) but plain torch still gives the recorded "
            f"{replayed[q]:.6g}: nnsight's tracing (or how pytest-nnsight drives it) changed, not the model"
        )
    if _close(nnsight_now, replayed, atol, rtol):
        return "model-changed", (
            f"{q} moved {recorded[q]:.6g} -> {nnsight_now[q]:.6g} and plain torch moved with it ({replayed[q]:.6g}): "
            "the model's own numbers changed (transformers, torch or the weights), not nnsight's tracing"
        )
    if n_ok:
        return "replay-differs", (
            f"nnsight still gives the recorded {q} {recorded[q]:.6g} but the replay gives {replayed[q]:.6g}: "
            "the replay's setup differs from nnsight's (tokenizer, hook site); check the spec"
        )
    return "both-changed", (
        f"{q}: recorded {recorded[q]:.6g}, nnsight now {nnsight_now[q]:.6g}, replay {replayed[q]:.6g}: "
        "both moved, differently: the model's numbers and nnsight's tracing changed"
    )


# -- command line ---------------------------------------------------------------------------------


def _short_error(exc: BaseException) -> str:
    """One line for an error; nnsight 0.5-0.7 put a whole formatted traceback in str(), whose last line is the cause."""
    text = str(exc)
    first = text.splitlines()[0] if text else ""
    if not first or "Traceback (most recent call last)" in first:
        lines = [ln.strip() for ln in str(getattr(exc, "original", None) or text).splitlines() if ln.strip()]
        first = first.split("Traceback (most recent call last)")[0] + (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {first[:300]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_nnsight.replay", description="Replay finding specs with plain torch hooks."
    )
    parser.add_argument("specs", nargs="+", help="finding spec JSON files (FindingSpec.save)")
    parser.add_argument(
        "--check", action="store_true", help="also recompute each finding through nnsight and diagnose what moved"
    )
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    loaded: list[tuple[str, FindingSpec | None, Any]] = []
    for path in args.specs:  # every replay runs before nnsight is imported
        try:
            spec = FindingSpec.load(path)
            result: Any = replay(spec, device=args.device)
        except Exception as exc:  # one broken spec must not hide the others
            spec, result = None, f"{type(exc).__name__}: {exc}"
        loaded.append((path, spec, result))
    cache = None
    for path, spec, result in loaded:
        row: dict[str, Any] = {
            "name": spec.name if spec else Path(path).stem,
            "file": path,
            "test": spec.test if spec else "",
            "quantity": "normalized",
        }
        if spec is None or isinstance(result, str):
            row["error"] = result
            rows.append(row)
            continue
        row.update(
            recorded=spec.recorded,
            recorded_environment=spec.environment,
            replay=result.values,
            replay_seconds=round(result.seconds, 3),
        )
        now = None
        if args.check:
            try:
                if cache is None:
                    from .models import ModelCache
                    from .settings import Settings

                    cache = ModelCache(Settings(device=args.device, offline=True))
                now = compute_with_nnsight(spec, cache.get(spec.model))
                row["nnsight"] = now
            except Exception as exc:
                row["nnsight"] = _short_error(exc)
        status, text = diagnose(spec.recorded, now, result.values, atol=spec.tolerance)
        if isinstance(row.get("nnsight"), str):
            ok = _close(result.values, spec.recorded, spec.tolerance, 1e-4)
            status = "nnsight-error" if ok else "model-changed"
            text = f"nnsight failed ({row['nnsight']}); the replay {'gives' if ok else 'does not give'} the recorded numbers"
        row.update(status=status, diagnosis=text)
        rows.append(row)
        print(f"{row['name']}: {status}: {text}")
    for row in rows:
        if "error" in row:
            print(f"{row['name']}: error: {row['error']}")
    if args.json:
        atomic_write(args.json, json.dumps({"versions": library_versions(), "findings": rows}, indent=1) + "\n")
    return 0 if all(r.get("status") == "stable" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
