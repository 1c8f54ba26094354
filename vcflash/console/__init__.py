"""The web console (issue 13): cameras, timeline and chat in the browser, on the HTTP port of `vcflash up` or, in the
split deployment, of `vcflash ingest` (`split.py`; its chat asks the reasoner service, `remote.py`).

The front end is plain ES modules and one CSS file in `static/`, served as they are: no build step, no CDN.
"""

from vcflash.console.server import add_console

__all__ = ["add_console"]
