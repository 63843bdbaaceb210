"""Suite-wide settings: offline, Ray without token auth, NLTK data from ../shared when present."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # Triton reads TRITON_INTERPRET when kernels are defined: set it before any test imports them
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
os.environ.setdefault("LVLM_CACHE", tempfile.mkdtemp(prefix="lvlm-cache-"))  # model profiles
_shared_nltk = Path(__file__).resolve().parents[2] / "shared" / "nltk_data"
if "NLTK_DATA" not in os.environ and _shared_nltk.is_dir():
    os.environ["NLTK_DATA"] = str(_shared_nltk)
