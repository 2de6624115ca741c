"""Write Twisted's plugin cache (``dropin.cache``) once, at install time, valid by construction.

Why: ``twistd`` looks its plugins up at every start and rewrites ``dropin.cache`` in each
``twisted/plugins`` directory whenever a plugin module's modification time is *equal to or
newer than* the cache's (``twisted.plugin.getCache`` compares with ``>=``). Container image
layers keep whole-second timestamps, so a cache written in the same second as pip installed
the modules looks stale once the image is built; and on a read-only root (Kubernetes
``readOnlyRootFilesystem``, systemd ``ProtectSystem=strict``) twistd then logs "Unable to
write to plugin cache ... error number 30" at every start and re-imports every plugin. Timing
luck decided it (3 builds of 4 showed it). Here the cache's own timestamp is set at least two
whole seconds after the newest plugin module, so the comparison holds after any rounding to
whole seconds, whatever the clock did during the build.

Run it as the last step of an installation that may write site-packages::

    /opt/hsmocsp/bin/python -m hsmocsp.plugincache
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from types import ModuleType

from hsmocsp.errors import PluginCacheError

#: Whole seconds between the newest plugin module and the cache. One is enough for
#: Twisted's ``>=``; two leaves room for a filesystem that rounds instead of truncating.
MARGIN = 2


def _plugins_package() -> ModuleType:
    import twisted.plugins

    return twisted.plugins


def plugin_dirs(package: ModuleType | None = None) -> list[Path]:
    """The directories Twisted searches for plugins: every entry of the package's ``__path__``."""
    package = _plugins_package() if package is None else package
    return [Path(p) for p in package.__path__ if Path(p).is_dir()]


def stale_modules(directory: Path) -> list[str]:
    """Plugin modules in ``directory`` that Twisted would reload, cache timestamps in whole seconds.

    Whole seconds because that is what an image layer keeps: a cache that is valid only by a
    fraction of a second on the build machine is stale in the image.
    """
    cache = directory / "dropin.cache"
    if not cache.is_file():
        return sorted(p.name for p in directory.glob("*.py") if p.name != "__init__.py")
    cached = math.floor(cache.stat().st_mtime)
    return sorted(
        p.name
        for p in directory.glob("*.py")
        if p.name != "__init__.py" and math.floor(p.stat().st_mtime) >= cached
    )


def _settle(directory: Path) -> None:
    """Move the cache's timestamp to ``MARGIN`` whole seconds after the newest module."""
    cache = directory / "dropin.cache"
    if not cache.is_file():
        raise PluginCacheError(f"{cache} was not written (is {directory} writable?)")
    modules = [p.stat().st_mtime for p in directory.glob("*.py")]
    newest = math.floor(max(modules, default=0.0))
    when = max(math.floor(cache.stat().st_mtime), newest + MARGIN)
    os.utime(cache, (when, when))


def write_cache(package: ModuleType | None = None) -> list[Path]:
    """Write and settle every plugin cache; return the caches. Raises PluginCacheError.

    The caches are (re)written by asking Twisted for the plugins, exactly as twistd does, so
    their content is Twisted's own; only their timestamps are ours. ``package`` is the
    plugin package (``twisted.plugins``; another one in tests).
    """
    from twisted.plugin import IPlugin, getPlugins

    package = _plugins_package() if package is None else package
    names = {getattr(p, "tapname", None) for p in getPlugins(IPlugin, package)}
    if "hsmocsp" not in names:
        raise PluginCacheError("Twisted finds no 'hsmocsp' plugin: is hsmocsp installed?")
    dirs = plugin_dirs(package)
    for directory in dirs:
        _settle(directory)
        if stale := stale_modules(directory):
            raise PluginCacheError(f"{directory}/dropin.cache is older than {', '.join(stale)}")
    return [d / "dropin.cache" for d in dirs]


def main(argv: list[str] | None = None) -> int:
    """``python -m hsmocsp.plugincache``: write the caches, say where; 1 on failure."""
    del argv
    try:
        caches = write_cache()
    except PluginCacheError as err:
        print(f"hsmocsp.plugincache: {err}", file=sys.stderr)
        return 1
    for cache in caches:
        print(f"wrote {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
