import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parents[2]):  # this folder (test devices) and the repo root (scheduler)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
