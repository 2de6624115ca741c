"""hsmocsp.plugincache: the plugin cache stays valid when timestamps become whole seconds.

The failure it prevents (issue 14, defect 1): an image layer keeps whole-second mtimes, so a
``dropin.cache`` written in the same second as the plugin modules is stale to Twisted, which
then rewrites it at every start (and logs "Unable to write to plugin cache" on a read-only
root). These tests use a throw-away plugin package, never the installed ``twisted.plugins``.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from twisted.plugin import IPlugin, getPlugins

from hsmocsp import plugincache
from hsmocsp.errors import PluginCacheError

PLUGIN = """\
from twisted.application.service import ServiceMaker

hsmocsp = ServiceMaker("hsmocsp", "hsmocsp.tap", "test plugin", "hsmocsp")
"""


@pytest.fixture
def package(tmp_path: Path) -> Iterator[ModuleType]:
    name = f"hsmocsp_test_plugins_{os.getpid()}_{time.monotonic_ns()}"
    directory = tmp_path / name
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    (directory / "hsmocsp_plugin.py").write_text(PLUGIN)
    (directory / "other_plugin.py").write_text("x = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def _as_in_an_image(directory: Path, when: int) -> None:
    """Every file's mtime becomes the same whole second, as a layer written quickly keeps it."""
    for path in directory.iterdir():
        if path.is_file():
            os.utime(path, (when, when))


def _rewritten_by_twisted(package: ModuleType) -> bool:
    """Does Twisted rewrite the cache when it looks the plugins up (what twistd does)?"""
    cache = Path(package.__path__[0]) / "dropin.cache"
    before = cache.stat().st_mtime_ns
    list(getPlugins(IPlugin, package))
    return cache.stat().st_mtime_ns != before


def test_a_cache_written_in_the_same_second_is_rewritten_at_every_start(
    package: ModuleType,
) -> None:
    """The defect, shown with Twisted's own code: same whole second => stale."""
    directory = Path(package.__path__[0])
    list(getPlugins(IPlugin, package))  # twistd's first start writes the cache
    _as_in_an_image(directory, int(time.time()) - 100)
    assert plugincache.stale_modules(directory) == ["hsmocsp_plugin.py", "other_plugin.py"]
    assert _rewritten_by_twisted(package)


def test_write_cache_survives_whole_second_timestamps(package: ModuleType) -> None:
    directory = Path(package.__path__[0])
    when = int(time.time()) - 100
    _as_in_an_image(directory, when)  # modules installed in this second...
    (cache,) = plugincache.write_cache(package)  # ...and the cache written "now"
    # The layer: every timestamp cut to whole seconds; the modules still in the same second.
    for path in directory.iterdir():
        if path.is_file():
            cut = int(path.stat().st_mtime)
            os.utime(path, (cut, cut))
    assert cache.stat().st_mtime >= when + plugincache.MARGIN
    assert plugincache.stale_modules(directory) == []
    assert not _rewritten_by_twisted(package)


def test_write_cache_settles_even_a_cache_written_in_the_modules_second(
    package: ModuleType,
) -> None:
    """The worst case: the clock still in the modules' second when the cache is written."""
    directory = Path(package.__path__[0])
    future = int(time.time()) + 100  # the modules look newer than "now"
    for path in directory.glob("*.py"):
        os.utime(path, (future, future))
    plugincache.write_cache(package)
    assert plugincache.stale_modules(directory) == []
    assert not _rewritten_by_twisted(package)


def test_a_package_without_the_hsmocsp_plugin_is_an_error(package: ModuleType) -> None:
    (Path(package.__path__[0]) / "hsmocsp_plugin.py").write_text("x = 2\n")
    with pytest.raises(PluginCacheError, match="no 'hsmocsp' plugin"):
        plugincache.write_cache(package)
