"""One place that keeps secrets out of what finetune shows or writes: every message from a server
(the Hub, and later the experiment trackers) passes through `redact` before it reaches the user.

A server can quote the request back, headers included (a misconfigured proxy answering 500 with
the request it received). What is replaced: the Hugging Face token from the environment and from
huggingface_hub's token files, the values of environment variables whose names say they are secret
(`*TOKEN*`, `*SECRET*`, `*KEY*`, `*PASSWORD*`), anything shaped like a Hub token (`hf_…`), and the
credentials after `Bearer` / `Basic`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MASK = "***"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.I)
_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{16,}"),  # Hub tokens: hf_ and 34 letters and digits
    re.compile(r"(?<=Bearer )[^\s'\",;]+", re.I),
    re.compile(r"(?<=Basic )[A-Za-z0-9+/=]{8,}", re.I),
]
_MIN_LENGTH = 6  # shorter values (a KEY=1 flag) would mask ordinary words


def secrets() -> list[str]:
    """The secret values known here, longest first (so a token is masked before any part of it)."""
    found = {value for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= _MIN_LENGTH}
    found.update(_token_files())
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret replaced by ***."""
    for value in secrets():
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(MASK, text)
    return text


@contextmanager
def redacted_logs(*names: str) -> Iterator[None]:
    """Within the block, the records of these loggers (huggingface_hub's, say) are redacted before any handler sees them."""
    loggers = [logging.getLogger(name) for name in names]
    redacting = _RedactingFilter()
    for logger in loggers:
        logger.addFilter(redacting)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(redacting)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def _token_files() -> set[str]:
    """The tokens huggingface_hub stores (`hf auth login`): the active one and every saved one."""
    from huggingface_hub import constants

    found = set()
    for path in (constants.HF_TOKEN_PATH, constants.HF_STORED_TOKENS_PATH):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():  # `token` holds the token; `stored_tokens` is INI: name = token
            value = line.split("=", 1)[1].strip() if "=" in line else line.strip()
            if len(value) >= _MIN_LENGTH:
                found.add(value)
    return found
