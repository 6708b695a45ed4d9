"""The pytest11 entry point: options, ini keys, markers and hooks. Imports only pytest and the standard library."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import (
    hints as _hints,
    report as _report,
    run_records as _run_records,
    settings as _settings,
    structure_lock as _structure_lock,
)
from .environment import library_versions
from .errors import SettingsError
from .fixtures import (  # noqa: F401  (fixtures pytest collects from this module)
    ACTIVATION_CACHE_KEY,
    CACHE_KEY,
    LOCK_KEY,
    SETTINGS_KEY,
    activation_cache,
    finding_snapshot,
    model,
    nnsight_model,
    nnsight_models,
)
from .snapshots import hooks as _snapshot_hooks
from .snapshots.structure_fixture import structure_snapshot  # noqa: F401

REPORT_KEY = pytest.StashKey["_report.ReportState"]()

MARKERS = (
    "nnsight_models(*model_ids): run the test once per model, served through the `model` fixture "
    "(ids: hub ids, local checkpoint dirs, or bundled:NAME).",
    "gpu: the test needs a CUDA device; skipped with a reason where there is none.",
    _run_records.MARKER,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nnsight", "pytest-nnsight (interpretability findings as tests)")
    for opt in _settings.OPTIONS:
        where = f"env {opt.env}, ini {opt.ini}"
        if opt.metavar is None:
            group.addoption(
                opt.flag,
                action="store_const",
                const=True,
                default=None,
                dest=opt.dest,
                help=f"{opt.help} (default: off; {where}).",
            )
        else:
            group.addoption(
                opt.flag,
                action="store",
                default=None,
                dest=opt.dest,
                metavar=opt.metavar,
                help=f"{opt.help} (default: {opt.default}; {where}).",
            )
        parser.addini(opt.ini, help=f"{opt.help} (default: {opt.default}).", type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    cli = {o.noun: config.getoption(o.dest, None) for o in _settings.OPTIONS}
    ini = {o.noun: config.getini(o.ini) for o in _settings.OPTIONS}
    try:
        resolved = _settings.resolve(cli, ini=ini)
        if resolved.device.startswith("cuda"):  # asked for explicitly: check now, not in 50 failing tests
            from .models import resolve_device

            resolve_device(resolved.device)
        if (
            resolved.remote != "off"
        ):  # --nnsight-remote ndif without NDIF_API_KEY: a usage error now (key never printed)
            from .remote import check_remote

            check_remote(resolved)
        if resolved.hypothesis_profile:  # imports hypothesis (~0.3 s) only when a profile is asked for
            _settings.load_hypothesis_profile(resolved.hypothesis_profile, resolved.source_of("hypothesis_profile"))
        report_state = _report.configure(config, resolved)  # an unwritable --nnsight-report DIR stops the run now
        if resolved.review and report_state.directory is None and getattr(config, "cache", None) is not None:
            # the review's figures: a report in the cache
            report_state.directory = Path(config.cache.mkdir("nnsight-review"))
    except SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = resolved
    if resolved.deterministic:  # imports torch only when asked for
        from .determinism import enable

        enable()
    _snapshot_hooks.configure(config, resolved)
    config.stash[LOCK_KEY] = _structure_lock.configure(
        config.rootpath, resolved.structure_lock, bool(getattr(config.option, "update_snapshots", False))
    )
    config.stash[REPORT_KEY] = report_state
    # collects the records of every report, workers' too
    config.pluginmanager.register(report_state, "nnsight-findings")
    if not hasattr(config, "workerinput"):  # the controller clears once, before xdist workers start
        from .activation_cache import clear_at_start

        clear_at_start(config, resolved)


def pytest_unconfigure(config: pytest.Config) -> None:
    _snapshot_hooks.unconfigure(config)
    if SETTINGS_KEY in config.stash:
        _structure_lock.unconfigure()
    if SETTINGS_KEY in config.stash and config.stash[SETTINGS_KEY].deterministic:
        from .determinism import disable

        disable()
    if config.stash[SETTINGS_KEY].hypothesis_profile if SETTINGS_KEY in config.stash else False:
        _settings.restore_hypothesis_profile()


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = config.stash[SETTINGS_KEY]
    v = library_versions()
    from .devices import header as _device_header  # stdlib-only module; torch only when CUDA was asked for or is loaded

    workerinput = getattr(config, "workerinput", None)
    workers = len(config.getoption("tx", None) or []) if config.getoption("dist", "no") != "no" else 0
    device = _device_header(s.device, workers=workers, worker=workerinput["workerid"] if workerinput else None)
    device += f", remote {s.remote}" if s.remote != "off" else ""
    from .compatibility import (
        header_line as _compat_line,  # stdlib only: is this combination in the version matrix's table?
    )

    return [
        f"pytest-nnsight: nnsight {v['nnsight']}, torch {v['torch']}, transformers {v['transformers']}; "
        f"device {device}, dtype {s.dtype}" + (", offline" if s.offline else ""),
        _compat_line(),
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("nnsight_models")
    if marker is None:
        return
    if not marker.args:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: @pytest.mark.nnsight_models() needs at least one model id"
        )
    if "model" not in metafunc.fixturenames:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: @pytest.mark.nnsight_models parametrizes the `model` fixture, "
            "but the test does not take a `model` argument"
        )
    ids = [m if isinstance(m, str) else type(m).__name__ for m in marker.args]
    metafunc.parametrize("model", list(marker.args), ids=ids, indirect=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    _structure_lock.start_item(item)  # the models this test is served are noted on it (hints, snapshot drift lines)
    if SETTINGS_KEY in item.config.stash and item.config.stash[SETTINGS_KEY].deterministic:
        from .determinism import seed_all

        seed_all()  # the same seeds before every test, whatever ran before it
    if item.get_closest_marker("gpu") is None:
        return
    s = item.config.stash[SETTINGS_KEY]
    if s.device == "cpu":
        pytest.skip(
            f"needs a CUDA device, but the device is cpu (from {s.source_of('device')}); use --nnsight-device auto or cuda"
        )
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device; torch {torch.__version__} sees none here (run it on a GPU runner)")


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: object, right: object) -> list[str] | None:
    """Explain a failed comparison of a measured value: the claim, site, position, prompts, numbers."""
    from .results import Measured

    if isinstance(left, Measured):
        return left.explain(op, right)
    if isinstance(right, Measured):
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        return right.explain(flipped, left)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):  # type: ignore[no-untyped-def]
    """Open the test's findings recorder while it runs: assertions, sweeps and snapshots record into it."""
    rec = _run_records.start(item)
    from .forward import baseline_scope  # torch loads with the first test, not at plugin import

    try:
        with baseline_scope():  # repeated patch() calls on one pair share their unpatched runs within this test
            yield
    finally:
        _run_records.finish(item, rec)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Measurements made while a fixture is set up (a module-scoped sweep, a session population) are recorded too."""
    rec = _run_records.start_fixture(fixturedef, request)
    try:
        yield
    finally:
        _run_records.finish_fixture(fixturedef, request, rec)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    _run_records.attach(item, outcome.get_result())  # the record travels on the report (and through xdist)
    _hints.attach(outcome.get_result(), call, item)  # one line naming the nnsight API change behind a known error


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _snapshot_hooks.record_skipped_test(report)  # a skipped test's snapshots are not stale


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _snapshot_hooks.module_skipped(report)  # nor are those of a module skipped at collection


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT_KEY in session.config.stash:  # --nnsight-report DIR: written once, by the controller
        _report.session_finish(session.config, session.config.stash[REPORT_KEY], session.config.stash[SETTINGS_KEY])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report_state = config.stash.get(REPORT_KEY, None)
    _snapshot_hooks.terminal_summary(terminalreporter, report_state.records.notes if report_state is not None else ())
    lines = _structure_lock.summary_lines()
    if lines and config.get_verbosity() >= 0:
        terminalreporter.section("pytest-nnsight structure lock")
        for line in lines:
            terminalreporter.write_line(line)
    _findings_summary(terminalreporter, config)
    if SETTINGS_KEY in config.stash and config.stash[SETTINGS_KEY].review and not hasattr(config, "workerinput"):
        from . import review

        state = config.stash[REPORT_KEY]
        review.run(
            config, terminalreporter, state.records.records, state.directory if state.result is not None else None
        )
    _activation_cache_summary(terminalreporter, config)
    cache = config.stash.get(CACHE_KEY, None)
    if cache is None or not cache.loaded() or config.get_verbosity() < 0:
        return
    terminalreporter.section("pytest-nnsight models")
    for entry in cache.loaded():
        terminalreporter.write_line(
            f"{entry.info.get('id', entry.key.source)}: {entry.info.get('device')} {entry.info.get('dtype')}, "
            f"loaded {cache.load_counts[entry.key]}x in {entry.load_seconds:.2f} s"
            + (f"; {entry.info['batching']}" if entry.info.get("batching") else "")
        )
    if getattr(cache, "hub_unreachable", None):
        terminalreporter.write_line(
            f"the model hub was unreachable ({cache.hub_unreachable}): later loads of this session ran offline; "
            "--nnsight-offline skips the hub from the start"
        )


def _findings_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Each finding's claim and numbers (with -v or --nnsight-summary), then where the report was written."""
    state = config.stash.get(REPORT_KEY, None)
    if state is None:
        return
    settings = config.stash[SETTINGS_KEY]
    asked = ["--nnsight-check-batching"] * settings.check_batching + [f"--nnsight-remote {settings.remote}"] * (
        settings.remote != "off"
    )
    _run_records.unserved_summary(terminalreporter, state.records, asked)
    _run_records.terminal_summary(terminalreporter, state.records, settings.summary or config.get_verbosity() > 0)
    for line in _report.terminal_lines(state):
        terminalreporter.write_line(line, red=line.startswith("could not"), bold=True)


def _activation_cache_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """One line on what the activation cache did this run (per process: xdist workers report nothing here)."""
    cache = config.stash.get(ACTIVATION_CACHE_KEY, None)
    if cache is None or config.get_verbosity() < 0 or not (cache.computed or cache.loaded):
        return
    where = cache.directory if cache.enabled else "off (--nnsight-no-cache), in memory"
    corrupt = (
        f", {cache.recomputed_corrupt} corrupt entr{'y' if cache.recomputed_corrupt == 1 else 'ies'} recomputed"
        if cache.recomputed_corrupt
        else ""
    )
    terminalreporter.write_line(
        f"activation cache {where}: {cache.computed} computed ({cache.forwards} forward passes), {cache.loaded} loaded{corrupt}"
    )
