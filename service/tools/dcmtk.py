"""DCMTK's command-line tools (storescp, storescu, echoscu, dcmj2pnm, ...), resolved explicitly.

pynetdicom installs console scripts with DCMTK's names (``storescp``, ``storescu``, ``echoscu``,
...). In an activated virtualenv or in the Docker image they come first on PATH, and a bench that
ran ``storescp`` from PATH would measure pynetdicom's example app against itself. A tool is
therefore taken from the first PATH entry whose ``--version`` names DCMTK, else from Debian's
``/usr/bin``; anything else is a clear error that says what was found and what to install.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

#: Where Debian's dcmtk package installs the tools; looked at after PATH.
DEBIAN_BIN = Path("/usr/bin")


class DcmtkMissingError(FileNotFoundError):
    """No DCMTK build of the tool is installed; the message names what was found instead."""


def is_dcmtk(executable: Path) -> bool:
    """True when ``executable --version`` says it is DCMTK's (``$dcmtk: storescp v3.6.7 ... $``)."""
    try:
        done = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = done.stdout + done.stderr
    return "$dcmtk:" in text or "OFFIS" in text


@functools.cache
def dcmtk_tool(name: str) -> str:
    """Absolute path of DCMTK's ``name`` (e.g. ``"storescp"``), never a same-named other program."""
    folders = [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p] + [DEBIAN_BIN]
    others: list[str] = []
    for folder in dict.fromkeys(folders):
        candidate = folder / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if is_dcmtk(candidate):
            return str(candidate)
        others.append(str(candidate))
    found = (
        f"; found only {', '.join(others)}, which is not DCMTK (pynetdicom installs tools of that name)"
        if others
        else ""
    )
    raise DcmtkMissingError(f"DCMTK's {name} is not installed{found}: install DCMTK (Debian: apt-get install dcmtk)")
