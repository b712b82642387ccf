"""Loading the ``.keras`` files busi saves: safely, with busi's own layers and losses registered.

In ``models`` (not ``runtime``) because loading needs the classes a model file names.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from busi.errors import BusiError
from busi.runtime import import_keras


def load_model(path, *, fix: str = "use a complete run folder, or retrain the run"):
    """Load a ``.keras`` file, or raise a BusiError that names the file and says why.

    Every model busi loads goes through here. Keras' own messages mislead (a
    truncated file is reported as "File not found") or invite ``safe_mode=False``,
    which would run whatever Python code the file carries: busi never does that.
    Its own models need no unsafe code (their layers are registered classes).
    """
    path = Path(path)
    if not path.is_file():
        raise BusiError("model file not found", where=str(path), fix=fix)
    if not zipfile.is_zipfile(path):
        raise BusiError("not a .keras model file (not a zip archive: truncated, corrupt, or "
                        "another format)", where=str(path), fix=fix)
    keras = import_keras()
    import busi.models.layers  # noqa: F401  (registers busi's custom layers)
    import busi.models.losses  # noqa: F401  (registers the losses and metrics checkpoints name)

    try:
        return keras.models.load_model(path)
    except Exception as exc:  # noqa: BLE001  -- any failure is about this file; say which
        text = str(exc)
        if "safe_mode" in text or "unsafe_deserialization" in text:
            raise BusiError("refused to load: the model holds Python code (a Lambda layer "
                            "or similar) that Keras' safe mode does not run, because loading it "
                            "could execute arbitrary code", where=str(path),
                            fix="load only models busi saved (they need no such code), or "
                                "rebuild the model without Lambda layers") from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise BusiError(f"cannot load the model ({type(exc).__name__}: {first[:300]})",
                        where=str(path), fix=fix) from None
