"""An on-disk activation cache: run a model on prompts once, keep chosen sites at chosen positions.

An entry is one safetensors file (tensor per site, [prompts, positions, d]) and a sidecar JSON
manifest holding its sha256; the manifest is written last and is the commit. Entries are keyed by
model id, weights fingerprint, device, prompts (and their token ids), sites, positions, storage
dtype and library versions. Batches stream into a preallocated file, so memory stays at one batch.
Writers of one key take a file lock (POSIX); every write is temp file + fsync + os.replace. Never
pickles. Module top imports only the standard library: the plugin imports `clear_at_start`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .cache_store import PREFIX, _locked, _StreamWriter, _write_atomic, check_writable, clear_directory, sha256_of
from .environment import library_versions
from .errors import (
    ActivationCacheError,
    ActivationCacheWarning,
    ArgumentError,
    PositionError,
    SiteNotCachedError,
    check_positive_int,
)

FORMAT = 1
DIR_NAME = "nnsight-activations"
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64"}
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "float64")


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Activations:
    """Cached activations: `acts[site]` is a CPU tensor [prompts, positions, d] in the stored dtype.

    `positions[i]` are the token indices stored for prompt i (in its own, unpadded tokens) and
    `tokens[i]` the tokens there; `source` says whether this call computed or loaded the entry.
    """

    key: str
    prompts: tuple[str, ...]
    sites: tuple[str, ...]
    positions: tuple[tuple[int, ...], ...]
    tokens: tuple[tuple[str, ...], ...]
    dtype: str
    source: str  # "computed", "loaded" or "memory" (caching off)
    path: Path | None = None
    names: Mapping[str, str] = field(default_factory=dict, repr=False)  # every accepted site name -> tensor name
    _memory: Mapping[str, Any] | None = field(default=None, repr=False)

    def tensor_name(self, site: Any) -> str:
        label = site if isinstance(site, str) else str(site)
        for candidate in (label, getattr(site, "path", None), site_key(site) if hasattr(site, "path") else None):
            if candidate in self.names:
                return self.names[candidate]
        raise SiteNotCachedError(
            f"site {label!r} was not cached in this entry: it holds {', '.join(self.sites)}. "
            "Add it to the sites= of activation_cache.get(...) (a new key, computed once)"
        )

    def __getitem__(self, site: Any) -> Any:
        name = self.tensor_name(site)
        if self._memory is not None:
            return self._memory[name]
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def at(self, site: Any, index: int = -1) -> Any:
        """[prompts, d] at the `index`-th stored position (default the last one), as float32 for fitting."""
        import torch

        return self[site][:, index, :].to(torch.float32)

    def iter_batches(self, site: Any, batch_size: int = 1024) -> Iterator[Any]:
        """The rows of `site` in slices of `batch_size` prompts, read from disk one slice at a time."""
        name = self.tensor_name(site)
        if self._memory is not None:
            yield from self._memory[name].split(batch_size)
            return
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            view = f.get_slice(name)
            n = view.get_shape()[0]
            for start in range(0, n, batch_size):
                yield view[start : start + batch_size]

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"Activations({len(self.prompts)} prompts x {len(self.positions[0]) if self.positions else 0} positions, {len(self.sites)} sites, {self.dtype}, {self.source}, key {self.key[:12]})"


def site_key(site: Any) -> str:
    """The tensor name of a Site: its path, ':input' for inputs, '#h' for one head."""
    key = site.path + ("" if site.part == "output" else f":{site.part}")
    return key + (f"#h{site.head}" if site.head is not None else "")


# -- the cache ---------------------------------------------------------------------------------------


class ActivationCache:
    """Runs a model on prompts once and keeps chosen sites at chosen positions on disk (safetensors).

    `directory=None` turns caching off: activations are computed each time and held in memory.
    `forwards` counts the batched forward passes this object ran; `computed` / `loaded` count entries.

    >>> acts = cache.get(model, ["The capital of France is"], sites="blocks", positions="last")   # doctest: +SKIP
    >>> acts["resid_post.0"].shape                                                                       # doctest: +SKIP
    torch.Size([1, 1, 64])
    """

    def __init__(self, directory: Path | str | None, *, models: Any = None, source: str = "default") -> None:
        self.directory = check_writable(Path(directory), source) if directory is not None else None
        self.models = models
        self.forwards = 0
        self.computed = 0
        self.loaded = 0
        self.recomputed_corrupt = 0

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def clear(self) -> int:
        """Delete every entry of this cache's directory; returns how many files went."""
        return clear_directory(self.directory) if self.directory is not None else 0

    def get(
        self,
        model: Any,
        prompts: Sequence[Any],
        sites: Any = "blocks",
        positions: Any = "last",
        *,
        dtype: str | None = None,
        batch_size: int = 32,
        check_batching: bool | None = None,
    ) -> Activations:
        """Activations of `sites` at `positions` for every prompt: loaded when cached, else computed and stored.

        `positions`: anything a position accepts ("last", an int, a word, a '{slot}', a list of ints),
        the same number of tokens in every prompt; "all" keeps whole sequences (zero-padded at the end).
        `dtype`: storage dtype (default: the model's). `check_batching` (None follows --nnsight-check-batching):
        after computing an entry, re-run a sample of prompts alone and fail with BatchingMismatchError on a difference.
        """
        plan = self._plan(model, prompts, sites, positions, dtype, batch_size)
        if self.directory is None:
            return self._checked(model, plan, self._compute(model, plan, None), check_batching)
        manifest_path = self.directory / f"{PREFIX}{plan['key']}.json"
        with _locked(self.directory / f"{PREFIX}{plan['key']}.lock"):
            found = self._load(manifest_path, plan)
            if found is not None:
                self.loaded += 1
                return found
            return self._checked(model, plan, self._compute(model, plan, manifest_path), check_batching)

    def _checked(self, model: Any, plan: Mapping[str, Any], acts: Activations, flag: bool | None) -> Activations:
        """--nnsight-check-batching for the cache: sampled prompts re-run one per trace must equal their batched rows."""
        import random

        import torch

        from . import settings as _settings
        from .errors import BatchingMismatchError
        from .metrics import Metric
        from .trace import run

        active = _settings.settings_of(model)
        if not (flag if flag is not None else active.check_batching) or len(plan["texts"]) < 2:
            return acts
        n = active.check_batching_cells
        tol = {"float16": 2e-2, "bfloat16": 5e-2}.get(plan["dtype"], 1e-4)
        bad = []
        for i in random.Random(0).sample(range(len(plan["texts"])), min(n, len(plan["texts"]))):
            _, single = run(
                model, plan["texts"][i], Metric("none", lambda out, ref: torch.zeros(1)), save=plan["sites"]
            )
            pos = plan["positions"][i]
            for s in plan["sites"]:
                want = single[s][0, pos].to("cpu", torch.float32)
                got = acts[s][i, : len(pos)].to(torch.float32)
                diff = float((want - got).abs().max())
                if not diff <= tol:
                    bad.append(f"  prompt {i} {plan['texts'][i]!r} at {s}: max |batched - single| {diff:.3g}")
        if bad:
            raise BatchingMismatchError(
                f"batched activation cache entry disagrees with single-prompt runs beyond {tol:g}:\n"
                + "\n".join(bad)
                + "\nthe batched path is wrong for this model (padding, position ids or batch-dependent modules): use batch_size=1 and report it"
            )
        return acts

    # -- planning: validate everything and derive the key before any forward pass ------------------
    def _plan(
        self, model: Any, prompts: Sequence[Any], sites: Any, positions: Any, dtype: str | None, batch_size: int
    ) -> dict[str, Any]:
        from .fingerprint import weights_fingerprint
        from .prompts import Tokens, check_context, normalizer_of, resolve_position, slots_of, text_of, tokens_of
        from .sites import resolve_sites

        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise PositionError(
                f"prompts must be a non-empty list of prompts, got {type(prompts).__name__} {str(prompts)[:60]!r}"
            )
        check_positive_int("batch_size", batch_size)
        module = getattr(model, "_module", model)
        param = next(module.parameters())
        model_dtype = str(param.dtype).replace("torch.", "")
        store = dtype or model_dtype
        if store not in STORAGE_DTYPES:
            raise ArgumentError(
                f"dtype {dtype!r}: expected one of {', '.join(STORAGE_DTYPES)} (or None for the model's {model_dtype})"
            )
        unique: dict[str, Any] = {}
        for s in resolve_sites(model, sites):
            unique.setdefault(site_key(s), s)  # a site named twice is stored once
        site_list = list(unique.values())
        texts = [text_of(p) for p in prompts]
        token_lists, resolved = [], []
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            tokens_of(model, texts[0])  # raises the no-tokenizer PositionError
        if any(hasattr(t, "ids") for t in texts):  # prompts given as token ids keep them
            ids = [list(t.ids) if hasattr(t, "ids") else list(tok(t)["input_ids"]) for t in texts]
        else:
            # one batched call: a rerun that loads pays little for its key
            ids = [list(row) for row in tok(texts)["input_ids"]]
        for p, text, row in zip(prompts, texts, ids):
            tokens = Tokens(tok.convert_ids_to_tokens(row), normalizer_of(tok))
            check_context(model, tokens, text)
            token_lists.append(tokens)
            if positions in ("all", None):
                resolved.append(list(range(len(tokens))))
            else:
                resolved.append(resolve_position(tokens, positions, prompt=text, slots=slots_of(p)))
        if positions not in ("all", None):
            counts = {len(r) for r in resolved}
            if len(counts) > 1:
                i = next(i for i, r in enumerate(resolved) if len(r) != len(resolved[0]))
                raise PositionError(
                    f"position {positions!r} names {len(resolved[0])} token(s) in {texts[0]!r} but {len(resolved[i])} in {texts[i]!r}: "
                    "a cache entry stores the same number of positions per prompt; use 'last', an int, or positions='all'"
                )
        model_id, device = self._model_id(model), str(param.device)
        digest = hashlib.sha256(json.dumps([texts, ids, resolved]).encode()).hexdigest()
        spec = {
            "format": FORMAT,
            "model": model_id,
            "weights": weights_fingerprint(model, self.models),
            "device": device,
            "model_dtype": model_dtype,
            "dtype": store,
            "sites": [site_key(s) for s in site_list],
            "positions": repr(positions),
            "prompts": digest,
            "n_prompts": len(texts),
            "versions": library_versions(),
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:40]
        width = max(len(r) for r in resolved)
        return {
            "key": key,
            "spec": spec,
            "sites": site_list,
            "texts": texts,
            "tokens": token_lists,
            "positions": resolved,
            "all": positions in ("all", None),
            "width": width,
            "dtype": store,
            "batch_size": batch_size,
        }

    def _model_id(self, model: Any) -> str:
        from .sites import model_name

        if self.models is not None:
            try:
                entry = self.models.info(model)
                rev = entry.key.revision
                return str(entry.info.get("id", entry.key.source)) + (f"@{rev}" if rev else "")
            except Exception:
                pass
        return model_name(model)

    # -- loading -------------------------------------------------------------------------------
    def _load(self, manifest_path: Path, plan: Mapping[str, Any]) -> Activations | None:
        if not manifest_path.exists():
            return None
        why = None
        try:
            manifest = json.loads(manifest_path.read_text())
            data = manifest_path.parent / manifest["data"]
            if manifest.get("format") != FORMAT or manifest.get("key") != plan["key"]:
                why = "its manifest belongs to another key or format"
            elif not data.is_file():
                why = f"its data file {data.name} is missing"
            elif data.stat().st_size != manifest["bytes"]:
                why = f"{data.name} has {data.stat().st_size} bytes, the manifest says {manifest['bytes']}"
            elif sha256_of(data) != manifest["sha256"]:
                why = f"the sha256 of {data.name} does not match its manifest"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"its manifest cannot be read ({type(exc).__name__}: {exc})"
        if why is not None:
            warnings.warn(
                ActivationCacheWarning(f"corrupt activation cache entry {manifest_path} ({why}); recomputing it"),
                stacklevel=4,
            )
            self.recomputed_corrupt += 1
            with contextlib.suppress(OSError):
                manifest_path.unlink()
            return None
        return self._result(plan, "loaded", data)

    def _result(
        self, plan: Mapping[str, Any], source: str, path: Path | None, memory: Mapping[str, Any] | None = None
    ) -> Activations:
        names: dict[str, str] = {}
        for s in plan["sites"]:
            key = site_key(s)
            names.update({key: key, str(s): key})
            if s.part == "output" and s.head is None:
                names[s.path] = key
        tokens = tuple(tuple(t[p] for p in pos) for t, pos in zip(plan["tokens"], plan["positions"]))
        return Activations(
            plan["key"],
            tuple(plan["texts"]),
            tuple(str(s) for s in plan["sites"]),
            tuple(tuple(p) for p in plan["positions"]),
            tokens,
            plan["dtype"],
            source,
            path,
            names,
            memory,
        )

    # -- computing -----------------------------------------------------------------------------
    def _compute(self, model: Any, plan: Mapping[str, Any], manifest_path: Path | None) -> Activations:
        import torch

        from .batching import encode, mixed_lengths_ok, runs
        from .metrics import Metric
        from .trace import run

        texts, sites, n, width = plan["texts"], plan["sites"], len(plan["texts"]), plan["width"]
        store = getattr(torch, plan["dtype"])
        writer: _StreamWriter | None = None
        memory: dict[str, Any] | None = None
        data_path = tmp_path = None
        if manifest_path is not None:
            data_path = manifest_path.with_name(f"{PREFIX}{plan['key']}.{uuid.uuid4().hex[:12]}.safetensors")
            tmp_path = data_path.with_name(data_path.name + ".tmp")
        try:
            # consecutive prompts share a trace; where padding could move a number, only prompts of equal length
            for part in runs([len(t) for t in plan["tokens"]], plan["batch_size"], mixed=mixed_lengths_ok(model)):
                start = part.start
                batch = texts[part.start : part.stop]
                none = Metric("none", lambda out, ref, k=len(batch): torch.zeros(k), last_only=True)  # reads no logits
                encoded = encode(model, list(batch))
                _, acts = run(model, list(batch), none, save=sites, lean=True)  # LM head on one position, no KV cache
                self.forwards += 1
                longest = max(len(t) for t in plan["tokens"][start : start + len(batch)])
                rows = {}
                for s in sites:
                    full = acts[s]
                    if full.shape[1] != longest:
                        raise ActivationCacheError(
                            f"the trace padded {len(batch)} prompts to {full.shape[1]} tokens, but they tokenize to at most {longest}"
                        )
                    out = torch.zeros(len(batch), width, full.shape[-1], dtype=store)
                    for r in range(len(batch)):
                        pos = plan["positions"][start + r]
                        out[r, : len(pos)] = full[r, encoded.padded(r, pos)].to("cpu", store)
                    rows[site_key(s)] = out
                if start == 0:
                    tensors = {k: (_CODES[plan["dtype"]], (n, width, v.shape[-1])) for k, v in rows.items()}
                    if manifest_path is not None:
                        writer = _StreamWriter(
                            tmp_path,
                            {**tensors, "__positions__": ("I64", (n, width))},
                            {"format": f"pytest-nnsight-activations/{FORMAT}"},
                        )
                    else:
                        memory = {k: torch.empty(shape, dtype=store) for k, (_, shape) in tensors.items()}
                for k, v in rows.items():
                    if writer is not None:
                        writer.write_rows(k, start, v)
                    else:
                        memory[k][start : start + len(batch)] = v
                del acts, rows
            if writer is None:
                self.computed += 1
                return self._result(plan, "memory", None, memory)
            pos = torch.full((n, width), -1, dtype=torch.int64)
            for i, p in enumerate(plan["positions"]):
                pos[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
            writer.write_rows("__positions__", 0, pos)
            writer.close()
            writer = None
            os.replace(tmp_path, data_path)
            manifest = {
                "format": FORMAT,
                "key": plan["key"],
                "data": data_path.name,
                "sha256": sha256_of(data_path),
                "bytes": data_path.stat().st_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "spec": plan["spec"],
                "sites": [str(s) for s in sites],
                "prompts": plan["texts"],
                "positions": plan["positions"],
            }
            _write_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
        except BaseException:
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.fh.close()
            for p in (tmp_path, data_path):
                if p is not None and manifest_path is not None and not _referenced(manifest_path, p):
                    with contextlib.suppress(OSError):
                        p.unlink()
            raise
        _remove_stale(manifest_path, data_path)
        self.computed += 1
        return self._result(plan, "computed", data_path)


def _referenced(manifest_path: Path, data: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return json.loads(manifest_path.read_text())["data"] == data.name
    return False


def _remove_stale(manifest_path: Path, keep: Path) -> None:
    """Delete older data files of this key, and temp files a killed writer left (we hold its lock, so no writer of it is running)."""
    stem = manifest_path.name[: -len(".json")]
    for p in [*manifest_path.parent.glob(f"{stem}.*.safetensors"), *manifest_path.parent.glob(f"{stem}.*.tmp")]:
        if p != keep:
            with contextlib.suppress(OSError):
                p.unlink()


def directory_for(config: Any, settings: Any) -> tuple[Path | None, str]:
    """The cache directory a pytest run uses (None when caching is off) and where that choice came from."""
    if settings.no_cache:
        return None, settings.source_of("no_cache")
    if settings.cache_dir:
        path = Path(settings.cache_dir).expanduser()
        return (path if path.is_absolute() else Path(config.rootpath) / path), settings.source_of("cache_dir")
    cache = getattr(config, "cache", None)
    if cache is None:
        raise ActivationCacheError(
            "pytest's cache is off (-p no:cacheprovider), so the activation cache has no default home: "
            "set --nnsight-cache-dir, or pass --nnsight-no-cache"
        )

    try:
        return Path(cache.mkdir(DIR_NAME)), "default (inside pytest's cache dir, cleared by --cache-clear)"
    except OSError:
        return Path(cache._cachedir) / "d" / DIR_NAME, "default (inside pytest's cache dir, cleared by --cache-clear)"


def clear_at_start(config: Any, settings: Any) -> int:
    """--nnsight-cache-clear empties the activation cache; --cache-clear also empties one set by --nnsight-cache-dir."""
    if not (settings.cache_clear or (settings.cache_dir and config.getoption("cacheclear", False))):
        return 0
    directory, _ = directory_for(config, settings)
    return clear_directory(directory) if directory is not None else 0
