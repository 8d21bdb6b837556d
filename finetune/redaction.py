"""One place that keeps secrets out of what finetune shows or writes: every message from a server
(the Hub, the experiment trackers) passes through `redact` before it reaches the user, and the
hyperparameters sent to a tracker leave out the settings `secret_setting` names.

A server can quote the request back, headers included (a misconfigured proxy answering 500 with
the request it received). What is replaced: the Hugging Face token from the environment and from
huggingface_hub's token files, the values of environment variables whose names say they are secret
(`*TOKEN*`, `*SECRET*`, `*KEY*`, `*PASSWORD*`, but not `*_PATH`, `*_FILE`, `*_DIR` ...), anything shaped
like a Hub token (`hf_…`), the credentials after `Bearer` / `Basic`, and `user:password@` in URLs.
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
_NOT_A_SECRET = re.compile(r"(_PATH|_FILE|_DIR|_DIRECTORY|_HOME|_URL|_ENDPOINT)$", re.I)  # where a secret is, not it
_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{16,}"),  # Hub tokens: hf_ and 34 letters and digits
    re.compile(r"(?<=Bearer )[^\s'\",;]+"),
    re.compile(r"(?<=Basic )(?=[A-Za-z0-9+/=]*[0-9+/=]|[A-Za-z][a-z]*[A-Z])[A-Za-z0-9+/=]{8,}"),  # base64, not a word
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in a URL (a proxy's)
]
_MIN_LENGTH = 6  # shorter values (a KEY=1 flag) would mask ordinary words
# A setting whose last word names a secret (hf_token, api_key, password), not one that merely contains
# the word (max_tokens, tokenizer, keep_last).
_SECRET_SETTING = re.compile(r"(^|[_.-])(token|secret|password|passwd|credentials?|api_?key|access_?key|private_?key)$", re.I)


def secrets() -> list[str]:
    """The secret values known here, longest first (so a token is masked before any part of it)."""
    found = {value for name, value in os.environ.items()
             if _SECRET_NAME.search(name) and not _NOT_A_SECRET.search(name) and len(value) >= _MIN_LENGTH}
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
def redacted_logs() -> Iterator[None]:
    """Within the block, every log record and warning is redacted before any handler shows it (huggingface_hub
    logs a server's warnings from its own child loggers, and warns through `warnings`)."""
    import warnings

    make_record = logging.getLogRecordFactory()

    def redacted_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        record.msg, record.args = redact(record.getMessage()), None
        return record

    with warnings.catch_warnings():
        show = warnings.showwarning
        warnings.showwarning = lambda message, *rest, **kw: show(redact(str(message)), *rest, **kw)
        logging.setLogRecordFactory(redacted_record)
        try:
            yield
        finally:
            logging.setLogRecordFactory(make_record)


def secret_setting(name: str) -> bool:
    """Whether a setting named `name` (a recipe key, a tracker option) holds a secret by its name."""
    return bool(_SECRET_SETTING.search(name))


def _token_files() -> set[str]:
    """The tokens huggingface_hub knows: the active one (wherever it comes from) and every one `hf auth login` saved."""
    from huggingface_hub import constants, get_token

    found = {get_token() or ""} - {""}
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
