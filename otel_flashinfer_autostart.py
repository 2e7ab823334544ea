"""The installed start-up hook of otel-flashinfer (standard library only).

``otel_flashinfer_autostart.pth`` in site-packages imports this module at interpreter
start when ``OTEL_FLASHINFER_LEVEL`` is above 0 and ``OTEL_FLASHINFER_AUTOSTART`` is
not 0 (the check is inline in the ``.pth``: with tracing off nothing is imported).

``.pth`` files run while ``site`` is still adding site folders, so a dependency in a
later folder (a ``--user`` install over system packages, a venv over
``--system-site-packages``) may not be importable yet.  ``install`` therefore only
puts a finder at the front of ``sys.meta_path`` that fires when ``site`` imports
``sitecustomize``: by then every folder is on ``sys.path``, and the application has
not started.  The finder removes itself and runs ``otel_flashinfer._autostart.start``
(which never raises), then lets the import go on as it would have.
"""

import sys


class _AtSiteCustomize:
    """A meta path finder that finds nothing; its first look-up of ``sitecustomize``
    starts instrumentation."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):  # noqa: ANN001, ANN206
        if name == "sitecustomize":
            _fire()
        return None


def _fire() -> None:
    try:
        sys.meta_path.remove(_AtSiteCustomize)
    except ValueError:
        return  # fired already
    try:
        from otel_flashinfer._autostart import start

        start()
    except Exception as exc:  # noqa: BLE001 - never stop the interpreter from starting
        sys.stderr.write(f"otel-flashinfer: start-up hook failed: {exc}\n")


def install() -> None:
    """Arm the hook (from the ``.pth``); fires at once when ``site`` is not running."""
    if _AtSiteCustomize in sys.meta_path:
        return
    sys.meta_path.insert(0, _AtSiteCustomize)
    if "site" in sys.modules and "sitecustomize" in sys.modules:
        _fire()  # loaded after start-up (site.addsitedir by hand): nothing to wait for
