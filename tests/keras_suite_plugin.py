"""A pytest plugin that runs Keras's own optimizer tests with every optimizer remote.

Loaded by tests/test_keras_suite.py into one pytest subprocess per Keras backend
(`python -m pytest -p keras_suite_plugin <keras/src/optimizers/*_test.py>`),
with `OPTSERVE_KERAS_SUITE_ADDRESS` naming a live server and
`OPTSERVE_KERAS_SUITE_REPORT` a JSON file to write.

Keras's test files are run unchanged, from the installed wheel. Each built-in
optimizer class a test module names (`from keras.src.optimizers.sgd import SGD`,
or `optimizers.SGD` through `from keras.src import optimizers`) is replaced, in
that module only, by a stand-in whose call returns
`RemoteOptimizer(SGD(*args, **kwargs), address)`: the arguments are checked by
Keras's own class, and the update runs on the server. Keras itself is not
patched (its torch backend, for one, looks the classes up by identity), except
while a test module is imported, so that classes it stores at import time
(`optimizer_sparse_test.py`'s table of cases) are the stand-ins too.

The report says, per test, its outcome, the first lines of its failure, and how
many remote optimizers it created (0: the test exercised no optimizer class).
"""

from __future__ import annotations

import json
import os
import types

import pytest

ADDRESS_VARIABLE = "OPTSERVE_KERAS_SUITE_ADDRESS"
REPORT_VARIABLE = "OPTSERVE_KERAS_SUITE_REPORT"

# The built-in optimizers the server runs (LossScaleOptimizer and MultiOptimizer wrap others).
SERVER_OPTIMIZERS = (
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adamax",
    "AdamW",
    "Ftrl",
    "Lamb",
    "Lion",
    "Muon",
    "Nadam",
    "RMSprop",
    "SGD",
    "ScheduleFreeAdamW",
)

_created = {"count": 0}


class _RemoteStandIn(type):
    """The metaclass of a stand-in: calling it makes a RemoteOptimizer around the real class."""

    def __call__(cls, *args, **kwargs):
        from optserve.client import RemoteOptimizer

        wrapped = cls.real_class(*args, **kwargs)
        _created["count"] += 1
        return RemoteOptimizer(wrapped, os.environ[ADDRESS_VARIABLE])

    def __instancecheck__(cls, instance):
        return isinstance(instance, cls.real_class)

    def __subclasscheck__(cls, subclass):
        return issubclass(subclass, cls.real_class)


def _stand_in(real_class):
    return _RemoteStandIn(f"Remote{real_class.__name__}", (), {"real_class": real_class})


def _stand_ins():
    import keras

    return {name: _stand_in(getattr(keras.optimizers, name)) for name in SERVER_OPTIMIZERS}


class _OptimizersModule(types.ModuleType):
    """`keras.src.optimizers` as a test module sees it: the built-in classes are stand-ins."""

    def __init__(self, real, stand_ins):
        super().__init__(real.__name__)
        self._real = real
        self.__dict__.update(stand_ins)

    def __getattr__(self, name):
        return getattr(self._real, name)


_STAND_INS: dict = {}


def _is_keras_optimizer_test(module) -> bool:
    return getattr(module, "__name__", "").endswith("_test") and "optimizers" in str(getattr(module, "__file__", ""))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """While a Keras test module is imported, the package's classes are the stand-ins."""
    if not isinstance(collector, pytest.Module):
        yield
        return
    from keras.src import optimizers

    if not _STAND_INS:
        _STAND_INS.update(_stand_ins())
    originals = {name: getattr(optimizers, name) for name in SERVER_OPTIMIZERS if hasattr(optimizers, name)}
    for name in originals:
        setattr(optimizers, name, _STAND_INS[name])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(optimizers, name, original)
    module = getattr(collector, "_obj", None)
    if module is not None and _is_keras_optimizer_test(module):
        _substitute(module, optimizers)


def _substitute(module, optimizers):
    by_real_class = {stand_in.real_class: stand_in for stand_in in _STAND_INS.values()}
    for name, value in list(vars(module).items()):
        if value is optimizers:
            setattr(module, name, _OptimizersModule(optimizers, _STAND_INS))
        elif isinstance(value, type) and value in by_real_class:
            setattr(module, name, by_real_class[value])


_results: dict = {}
_keys: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _keys[item.nodeid] = f"{item.path.name}::{item.nodeid.partition('::')[2]}"
    before = _created["count"]
    yield
    _entry(item.nodeid)["remote_optimizers"] = _created["count"] - before


def _entry(nodeid):
    # `sgd_test.py::SGDTest::test_weight_decay`, wherever the wheel is installed.
    return _results.setdefault(_keys.get(nodeid, nodeid), {})


def pytest_runtest_logreport(report):
    entry = _entry(report.nodeid)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome
        if report.when == "setup" and report.failed:
            outcome = "error"
        entry["outcome"] = outcome
        if report.failed:
            entry["message"] = _short(report)
        elif report.skipped and isinstance(report.longrepr, tuple):
            entry["message"] = str(report.longrepr[2])
    elif report.when == "teardown" and report.failed:
        entry["outcome"] = "error"
        entry["message"] = _short(report)


def _short(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return "\n".join(text.splitlines()[:6])[:800]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(REPORT_VARIABLE)
    if not path:
        return
    with open(path, "w") as report:
        json.dump({"backend": os.environ.get("KERAS_BACKEND"), "tests": _results}, report, indent=1, sort_keys=True)
