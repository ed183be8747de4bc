"""The Ray cluster token, found where Ray itself looks: RAY_AUTH_TOKEN, then the file named by
RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. No Ray import: vigocli reads it to authenticate
to the dashboard and to the gateway's admin channel, the gateway reads it to check admin frames.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH)


def load_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    try:
        text = token_path().read_text().strip()
    except OSError:
        return None
    return text or None
