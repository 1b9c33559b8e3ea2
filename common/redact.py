"""Secret redaction: nothing a run or an export writes may carry a token or a password.

clean = redact_secrets(run_config, secret_env_values())   # {"hf_token": "<redacted>", ...}
"""

import os
import re
from collections.abc import Mapping, Sequence

REDACTED = "<redacted>"
# Environment variables whose values are never written anywhere (plus any whose name looks secret).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY")
# A key is secret when one of its words is one of these ("hf_token", "wandbApiKey", "db_password")...
SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials", "auth"}
# ...unless its last word says it holds a number or a type ("pad_token_id", "max_token_len").
NON_SECRET_LAST_WORDS = {"id", "ids", "index", "indices", "len", "length", "count", "size", "limit", "type", "dtype"}
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")


def is_secret_key(key: str) -> bool:
    """Whether values under a config key or environment variable name must be redacted.

    Whole words are matched: "max_new_tokens", "tokenizer", "keep_last" are not secret; "hf_token",
    "wandbApiKey", "db_password" are; "secret"/"password" anywhere always is."""
    lowered = str(key).lower()
    if "secret" in lowered or "password" in lowered:
        return True
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(key))
    words = [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]
    return bool(words) and words[-1] not in NON_SECRET_LAST_WORDS and any(word in SECRET_WORDS for word in words)


def secret_env_values(environ: Mapping[str, str] | None = None, min_length: int = 8) -> list[str]:
    """Values of secret environment variables, longest first; values shorter than `min_length` are ignored
    (redacting "1" everywhere would destroy every number)."""
    environ = os.environ if environ is None else environ
    values = {
        value for name, value in environ.items() if (name in SECRET_ENV_VARS or is_secret_key(name)) and value.strip()
    }
    return sorted((v for v in values if len(v) >= min_length), key=len, reverse=True)


def redact_secrets(data: object, secrets: Sequence[str] = ()) -> object:
    """A copy of nested `data` with "<redacted>" for every non-empty value under a secret key, every
    occurrence of a value in `secrets` inside a string, and anything shaped like an hf_... token."""
    if isinstance(data, Mapping):
        return {
            key: REDACTED if is_secret_key(key) and value not in (None, "", [], {}) else redact_secrets(value, secrets)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact_secrets(value, secrets) for value in data]
    if isinstance(data, str):
        for secret in secrets:
            data = data.replace(secret, REDACTED)
        return HF_TOKEN_PATTERN.sub(REDACTED, data)
    return data
