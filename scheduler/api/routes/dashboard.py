"""The built-in sustainability dashboard: GET /dashboard, one self-contained page.

The HTML itself needs no key (it holds no data); every data call it makes carries the reader's key.
It reads /v1/energy/summary, /v1/energy/methods, /v1/energy/requests and /v1/devices.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE_PATH = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


@lru_cache(maxsize=1)
def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: only its own inline script and style (by hash) may run."""
    html = PAGE_PATH.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), csp


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    body, csp = _page()
    return HTMLResponse(body, headers={
        "Content-Security-Policy": csp,
        # the page may carry a key in its #fragment for a moment; never leak the URL onwards
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    })
