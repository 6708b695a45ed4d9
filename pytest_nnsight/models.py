"""Loading models once per session: resolve a model id, load it on the device and dtype, wrap it for nnsight.

torch, transformers and nnsight are imported here only inside functions, when a model is first needed.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import bundled
from .errors import ModelLoadError, ModelSpecError, ModelUnavailableError, ModelUsageError, SettingsError
from .remote import NDIF_MODELS
from .settings import Settings, attach

if TYPE_CHECKING:
    import torch

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
ACCEPTED_FORMS = (
    "a hub id ('gpt2', 'EleutherAI/pythia-70m'), a local checkpoint directory, "
    "a bundled model ('bundled:capitals'), or a torch.nn.Module with tokenizer="
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def import_nnsight() -> Any:
    """Import nnsight on first use, keeping pytest's process state as it was.

    nnsight 0.8 reads `-v` from `sys.argv` and turns on its DEBUG mode (hazard H14), which
    changes tracebacks under `pytest -v`; debug stays off unless NNSIGHT_DEBUG asks for it.
    """
    if "nnsight" in sys.modules:
        return sys.modules["nnsight"]
    hook = sys.excepthook
    import nnsight

    sys.excepthook = hook
    app = getattr(getattr(nnsight, "CONFIG", None), "APP", None)
    if app is not None and hasattr(app, "DEBUG"):
        app.DEBUG = bool(os.environ.get("NNSIGHT_DEBUG"))
    return nnsight


def resolve_device(device: str) -> str:
    """Turn a device setting into a concrete torch device string ('auto' picks CUDA when present).

    Under pytest-xdist, 'cuda' and 'auto' pin worker gwN to cuda:(N % visible GPUs) (see devices.py).
    """
    from .devices import current_device

    return current_device(device)


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: Any = None) -> "torch.dtype":
    """Turn a dtype setting into a torch dtype for `device`; reject a dtype the device cannot run."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and checkpoint_dtype in (torch.float16, torch.bfloat16):
            dtype_obj = checkpoint_dtype
        else:
            return torch.float32
    else:
        dtype_obj = getattr(torch, dtype)
    if dtype_obj == torch.bfloat16 and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise SettingsError(
            f"dtype 'bfloat16' is not supported by {device} ({torch.cuda.get_device_name(device)}): use float16 or float32"
        )
    return dtype_obj


@dataclass(frozen=True)
class ModelKey:
    """What makes two loads the same model: source, revision, device and dtype."""

    source: str
    revision: str | None
    device: str
    dtype: str

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.source}{rev} on {self.device} in {self.dtype}"


@dataclass
class LoadedModel:
    """A model held by the session cache, with what is known about where it came from."""

    key: ModelKey
    model: Any  # the nnsight wrapper
    tokenizer: Any
    load_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


class ModelCache:
    """Session cache of nnsight-wrapped models: each (model, revision, device, dtype) loads once.

    >>> cache = ModelCache(Settings(device="cpu"))     # doctest: +SKIP
    >>> model = cache.get("bundled:capitals")          # doctest: +SKIP
    >>> cache.load_count("bundled:capitals")           # doctest: +SKIP
    1
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[ModelKey, LoadedModel] = {}
        self._by_wrapper: dict[int, LoadedModel] = {}
        self._modules: dict[int, Any] = {}  # keeps user-passed modules alive while their id() is a key
        self._lock = threading.RLock()
        self.load_counts: Counter[ModelKey] = Counter()
        # why the hub could not be reached; the rest of the session loads offline
        self.hub_unreachable: str | None = None
        self.on_serve: Any = None  # called with the LoadedModel on every serve (the plugin's structure lock)

    # -- public ---------------------------------------------------------------
    def get(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> Any:
        """The nnsight wrapper of `model`, loading it on first request."""
        key = self.key(model, revision=revision, device=device, dtype=dtype)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                loaded = self._load(key, model, tokenizer)
                self._models[key] = loaded
                self._by_wrapper[id(loaded.model)] = loaded
                self.load_counts[key] += 1
        if self.on_serve is not None:
            self.on_serve(loaded)
        return attach(loaded.model, self.settings)  # the core reads its run settings from the model (settings_of)

    def key(
        self, model: Any, *, revision: str | None = None, device: str | None = None, dtype: str | None = None
    ) -> ModelKey:
        """The cache key a request maps to; validates the model id, device and dtype."""
        from .settings import parse_device, parse_dtype

        device = _parsed("device", device or self.settings.device, parse_device)
        dtype_name = _parsed("dtype", dtype or self.settings.dtype, parse_dtype)
        device = resolve_device(device)
        source = self.source_of(model)
        return ModelKey(source, revision, device, dtype_name)

    def load_count(
        self, model: Any, *, revision: str | None = None, device: str | None = None, dtype: str | None = None
    ) -> int:
        """How many times this session loaded `model` (0 or 1 unless the cache was cleared)."""
        return self.load_counts[self.key(model, revision=revision, device=device, dtype=dtype)]

    def info(self, wrapped: Any) -> LoadedModel:
        """The cache entry of a wrapper this cache served."""
        try:
            return self._by_wrapper[id(wrapped)]
        except KeyError:
            raise ModelUsageError(
                f"{type(wrapped).__name__} object was not served by pytest-nnsight's model cache"
            ) from None

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def clear(self) -> None:
        """Forget every model (their memory is freed once tests drop their references)."""
        with self._lock:
            self._models.clear()
            self._by_wrapper.clear()
            self._modules.clear()

    # -- resolving ids -----------------------------------------------------------
    def source_of(self, model: Any) -> str:
        """A canonical string for what `model` names, or ModelSpecError when it names nothing loadable."""
        if isinstance(model, str):
            if model.startswith(bundled.PREFIX):
                bundled.path_of(model)  # raises for unknown names
                return model
            if model.strip() == "":
                raise ModelSpecError(f"empty model id {model!r}: expected {ACCEPTED_FORMS}")
            path = Path(model).expanduser()
            if (
                path.exists()
                or model.startswith((".", "/", "~"))
                or os.sep in model.rstrip(os.sep)
                and not HUB_ID_RE.match(model)
            ):
                return str(path.resolve())
            if HUB_ID_RE.match(model):
                return model
            raise ModelSpecError(
                f"model id {model!r} is not a hub id, an existing path nor a bundled name: expected {ACCEPTED_FORMS}"
            )
        if isinstance(model, os.PathLike):
            return str(Path(model).expanduser().resolve())
        if _is_module(model):
            self._modules[id(model)] = model
            return f"module:{type(model).__name__}@{id(model):x}"
        raise ModelSpecError(f"cannot serve a model from {type(model).__name__} {model!r}: expected {ACCEPTED_FORMS}")

    # -- loading ----------------------------------------------------------------
    def _load(self, key: ModelKey, model: Any, tokenizer: Any) -> LoadedModel:
        start = time.perf_counter()
        info: dict[str, Any] = {"id": key.source if not key.source.startswith("module:") else type(model).__name__}
        if _is_module(model):
            # The same module served on another device/dtype gets its own copy: .to() works in place.
            shared = any(k.source == key.source for k in self._models)
            module = copy.deepcopy(model) if shared else model
            tok = copy.deepcopy(tokenizer) if tokenizer is not None else None
            info["kind"] = "module"
        elif key.source.startswith(bundled.PREFIX):
            directory = bundled.verified_path(key.source)
            module, tok = _load_pretrained(str(directory), key.source, None, offline=True)
            info.update(kind="bundled", path=str(directory), manifest=bundled.manifest(key.source))
        elif self.settings.remote == "ndif" and not os.path.isabs(
            key.source
        ):  # --nnsight-remote ndif: NDIF holds the weights
            wrapped, tok = load_for_ndif(key.source, key.revision)
            info.update(kind="ndif", revision=key.revision, device="ndif", dtype="as NDIF serves it")
            return LoadedModel(key, wrapped, tok, time.perf_counter() - start, info)
        else:
            is_path = os.path.isabs(key.source)
            if is_path:
                _check_checkpoint_dir(key.source)
            offline = self.settings.offline or is_path or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            if (
                self.hub_unreachable is not None and not offline
            ):  # one failed attempt costs ~50 s: never pay it twice a session
                offline = True
            try:
                module, tok = _load_pretrained(
                    key.source,
                    key.source,
                    key.revision,
                    offline=offline,
                    switched=None if self.hub_unreachable is None or self.settings.offline else self.hub_unreachable,
                )
            except ModelUnavailableError as exc:
                if not offline and getattr(exc, "unreachable", False):
                    self.hub_unreachable = exc.why
                raise
            info.update(kind="path" if is_path else "hub", revision=key.revision)
            if tokenizer is not None:
                tok = copy.deepcopy(tokenizer)

        torch_dtype = resolve_dtype(key.dtype, key.device, _checkpoint_dtype(module))
        module = module.to(device=key.device, dtype=torch_dtype)
        module.eval()
        wrapped = wrap(module, tok)
        info.update(device=key.device, dtype=str(torch_dtype).replace("torch.", ""))
        from .batching import EQUAL_LENGTH_NOTE, mixed_lengths_ok
        from .families import check_on_load

        if tok is not None and not mixed_lengths_ok(wrapped):  # said once, in the models section of the run
            info["batching"] = EQUAL_LENGTH_NOTE
        family = check_on_load(wrapped)  # one probe forward for a known family; unknown architectures pass silently
        if family is not None:
            info["family"] = family
        return LoadedModel(key, wrapped, getattr(wrapped, "tokenizer", tok), time.perf_counter() - start, info)


def _checkpoint_dtype(module: Any) -> Any:
    """The dtype a checkpoint was saved in (config.dtype on transformers 5, torch_dtype before), or None."""
    import torch

    config = getattr(module, "config", None)
    fields = vars(config) if hasattr(config, "__dict__") else {}  # a plain torch module has no config
    value = fields.get("dtype", fields.get("torch_dtype"))
    if isinstance(value, str):
        value = getattr(torch, value.replace("torch.", ""), None)
    return value if isinstance(value, torch.dtype) else None


def _parsed(what: str, value: Any, parse: Any) -> str:
    if type(value).__name__ == "device":  # a torch.device
        value = str(value)
    if not isinstance(value, str):
        raise SettingsError(f"invalid {what} {value!r}: expected a string")
    try:
        return parse(value)
    except ValueError as exc:
        raise SettingsError(f"invalid {what} {value!r}: {exc}") from None


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _check_checkpoint_dir(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ModelUnavailableError(
            path, "no such file or directory", "Check the path, or build the checkpoint with save_pretrained() first."
        )
    if not p.is_dir():
        raise ModelSpecError(
            f"model path {path!r} is a file: expected a checkpoint directory holding config.json and the weights"
        )
    if not (p / "config.json").is_file():
        found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
        raise ModelSpecError(
            f"directory {path!r} has no config.json (it holds {found}): expected a transformers checkpoint directory "
            "as written by model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )


def _is_causal_config(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


NETWORK_WORDS = (
    "connect",
    "resolve",
    "timed out",
    "timeout",
    "network",
    "max retries",
    "unreachable",
    "temporary failure",
    "offline",
)


def _load_pretrained(
    source: str, display: str, revision: str | None, *, offline: bool, switched: str | None = None
) -> tuple[Any, Any]:
    """Load a transformers checkpoint (model and tokenizer) from a local dir or the hub cache."""
    import transformers

    def attempt(local_only: bool) -> Any:
        return transformers.AutoConfig.from_pretrained(source, revision=revision, local_files_only=local_only)

    try:
        try:
            config = attempt(True)  # a cached or local config never touches the network
            local_only = True
        except OSError:
            if offline:
                raise
            config = attempt(False)
            local_only = False
    except (OSError, ValueError) as exc:
        how = (
            'Download it once where there is network access (e.g. `python -c "import transformers as t; '
            f"t.AutoModelForCausalLM.from_pretrained('{display}')\"`) or point HF_HOME at a cache that holds it; "
            "pass --nnsight-offline to skip hub lookups from the start, or --nnsight-require-models to fail instead of skip"
        )
        first = (str(exc).splitlines() or [""])[0][:200].rstrip(". ")
        if switched is not None:
            why = f"not in the local cache, and the hub was unreachable earlier in this session ({switched}), so this session loads offline"
        elif offline:
            why = "offline mode and not in the local cache"
        else:
            why = f"{type(exc).__name__}: {first}"
        err = ModelUnavailableError(display, why, how)
        err.unreachable = not offline and any(w in str(exc).lower() for w in NETWORK_WORDS)
        raise err from None

    auto = transformers.AutoModelForCausalLM if _is_causal_config(config) else transformers.AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = auto.from_pretrained(source, revision=revision, local_files_only=local_only, config=config)
        except OSError as exc:
            if os.path.isdir(source):
                raise ModelLoadError(_corrupt_message(source, exc)) from None
            raise ModelUnavailableError(
                display,
                f"weights not found: {str(exc).splitlines()[0][:200]}",
                "Check the id and revision, or download the weights first",
            ) from None
        except Exception as exc:  # a truncated or foreign file surfaces as many exception types
            if os.path.isdir(source):
                raise ModelLoadError(_corrupt_message(source, exc)) from None
            raise ModelLoadError(f"could not load model {display!r}: {type(exc).__name__}: {exc}") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                source, revision=revision, local_files_only=local_only
            )
        except Exception:  # a checkpoint without a tokenizer is served without one
            tokenizer = None
    return model, tokenizer


def _corrupt_message(directory: str, exc: BaseException) -> str:
    """Name the weight file that cannot be read, so the user knows what to replace."""
    bad = None
    for f in sorted(Path(directory).iterdir()):
        if f.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as handle:
                    for name in handle.keys():
                        handle.get_slice(name)
            except Exception as inner:  # noqa: BLE001 - any failure marks the file
                bad = (f, inner)
                break
    if bad:
        return f"checkpoint file {str(bad[0])!r} is corrupt or truncated ({type(bad[1]).__name__}: {bad[1]}); re-save or re-download it"
    return f"could not load the checkpoint in {directory!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def wrap(module: Any, tokenizer: Any = None) -> Any:
    """Wrap a module for nnsight: the language-model wrapper for causal LMs with a tokenizer, NNsight otherwise.

    The tokenizer is pinned after wrapping so results do not depend on nnsight's version:
    left padding with a pad token (nnsight 0.8 forces it, 0.7 and older do not: H4/H5), and
    only `input_ids`/`attention_mask` reach the model (a locally built GPT-2 tokenizer under
    transformers 4.57 emits `token_type_ids`, which change GPT-2's logits: H7).
    """
    nnsight = import_nnsight()
    causal = (
        tokenizer is not None
        and hasattr(module, "config")
        and callable(getattr(module, "can_generate", None))
        and module.can_generate()
    )
    if causal:
        from .compat import wrap_language_model

        wrapped = wrap_language_model(nnsight, module, tokenizer=tokenizer)
        tok = wrapped.tokenizer
        tok.model_input_names = ["input_ids", "attention_mask"]
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return wrapped
    with warnings.catch_warnings():
        # BERT's child modules named `output` are served as `E_output` by nnsight 0.8; the notice is for nnsight users, not test output
        warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
        wrapped = nnsight.NNsight(module)
    if tokenizer is not None:
        wrapped.tokenizer = tokenizer
    module.register_forward_pre_hook(_text_guard(type(module).__name__, tokenizer is not None), with_kwargs=True)
    return wrapped


def _text_guard(name: str, has_tokenizer: bool) -> Any:
    """A pre-hook that turns a prompt string given to a tensor-only wrapper into one clear error."""

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        values = list(args) + list(kwargs.values())
        if any(
            isinstance(v, str) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v))
            for v in values
        ):
            prompt = next(v for v in values if isinstance(v, (str, list, tuple)))
            if has_tokenizer:
                fix = (
                    "pytest-nnsight's verbs (patch, sweep, population, the activation cache) take text and tokenize it with the "
                    "served tokenizer; in a raw trace, tokenize first: model.trace(**model.tokenizer(prompt, return_tensors='pt'))"
                )
            else:
                fix = "pass tokenizer= when asking for the model, or give token ids / tensors"
            raise ModelUsageError(
                f"{name} was served without a text interface, so it cannot take the prompt {prompt!r}: {fix}"
            )

    return hook


def load_for_ndif(repo_id: str, revision: str | None) -> tuple[Any, Any]:
    """The nnsight wrapper of a hub model that NDIF runs: config and tokenizer from the hub, weights never downloaded.

    nnsight builds the module on the meta device when given a repo id without `dispatch=True`; traces then
    run on NDIF's copy (`remote=True`). The tokenizer is pinned as for local models (left padding, a pad
    token, input_ids and attention_mask only), since prompts are tokenized here.
    """
    nnsight = import_nnsight()
    from .compat import wrap_language_model

    wrapped = (
        wrap_language_model(nnsight, repo_id, revision=revision) if revision else wrap_language_model(nnsight, repo_id)
    )
    tok = getattr(wrapped, "tokenizer", None)
    if tok is not None:
        tok.model_input_names = ["input_ids", "attention_mask"]
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
    NDIF_MODELS[id(wrapped)] = wrapped
    return wrapped, tok
