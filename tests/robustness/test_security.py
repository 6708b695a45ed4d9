"""Security: snapshot and cache files are data (JSON, safetensors), never unpickled; loading a model never runs
remote code (trust_remote_code stays off)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest_nnsight

PACKAGE = Path(pytest_nnsight.__file__).parent
UNSAFE = re.compile(
    r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\(|\btorch\.load\(|\bnp\.load\(|\bnumpy\.load\(|allow_pickle|"
    r"\bdill\b|\bjoblib\.load|trust_remote_code\s*=\s*True|(?<![.\w])eval\(|(?<![.\w])exec\("
)


def test_the_package_never_unpickles_nor_trusts_remote_code():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if UNSAFE.search(line.split("#", 1)[0]):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert not hits, "unsafe loading in the package:\n" + "\n".join(hits)


def test_loading_a_local_checkpoint_never_asks_for_remote_code(tmp_path, monkeypatch):
    import transformers

    from pytest_nnsight.models import ModelCache
    from pytest_nnsight.settings import Settings
    from pytest_nnsight.testing import tiny_gpt2

    module, tok = tiny_gpt2()
    module.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    calls: list[tuple[str, dict]] = []
    for cls in (
        transformers.AutoConfig,
        transformers.AutoModelForCausalLM,
        transformers.AutoModel,
        transformers.AutoTokenizer,
    ):
        original = cls.from_pretrained

        def recording(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    model = ModelCache(Settings(device="cpu", offline=True)).get(str(tmp_path / "ckpt"))
    assert model.tokenizer is not None
    names = [name for name, _ in calls]
    assert "AutoModelForCausalLM" in names and "AutoConfig" in names, names
    for name, kwargs in calls:
        assert not kwargs.get("trust_remote_code", False), (
            f"{name}.from_pretrained was called with trust_remote_code: {kwargs}"
        )


def test_a_snapshot_file_is_parsed_as_json_only(tmp_path):
    """A snapshot is JSON: a value that looks like code or a pickle stays a string."""
    from pytest_nnsight.snapshots.encode import loads

    payload = '{"format": "pytest-nnsight finding", "version": 1, "environment": {}, "finding": {"@type": "__import__(\'os\').system(\'touch pwned\')", "x": "cos\\nsystem\\n(S\'touch pwned\'\\ntR."}}'
    rec = loads(payload)
    assert isinstance(rec["finding"]["@type"], str)
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
