"""Real third-party ONNX models, as their PyPI wheels ship them (installed by scripts/setup).

silero-vad 6.2.3 (MIT) ships six voice-activity models whose weights sit in ``Constant`` nodes
and ``If`` branches, with a symbolic audio length and a sample-rate input; rapidocr-onnxruntime
1.4.4 (Apache-2.0) ships PaddleOCR's text detector, recognizer and orientation classifier, all
with symbolic image sides. The models are found through the installed packages' folders (no
import: silero_vad's ``__init__`` imports torch), never downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["ocr_model", "silero_model"]

_SETUP_HINT = "run `bash scripts/setup` (it installs the pinned model wheels with --no-deps)"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed: {_SETUP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def silero_model(name: str = "silero_vad.onnx") -> Path:
    """A model file of silero-vad's ``data`` folder."""
    path = _package_dir("silero_vad") / "data" / name
    if not path.is_file():
        raise RuntimeError(f"silero-vad lacks {name}: {_SETUP_HINT}")
    return path


def ocr_model(name: str = "ch_PP-OCRv4_det_infer.onnx") -> Path:
    """A model file of rapidocr-onnxruntime's ``models`` folder."""
    path = _package_dir("rapidocr_onnxruntime") / "models" / name
    if not path.is_file():
        raise RuntimeError(f"rapidocr-onnxruntime lacks {name}: {_SETUP_HINT}")
    return path
