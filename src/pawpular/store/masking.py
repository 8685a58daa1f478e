"""Secrets out of everything shown or written: a URL's password, however it is given (``svr.storage``, a command
line, a driver's message quoting its connection string). ``config.public_dict`` applies it to a whole config.
"""

from __future__ import annotations

import re

# scheme://user:PASSWORD@host: the password runs to the last '@' that a host follows (name or address, port,
# brackets, commas of a host list) and then the path, query or the end: a password may hold '@' and, after it,
# '/', '?' or '#' (masking to the first '@', or to one before a '/', would show the rest); an '@' in a query value
# ("?options=a@b&...") is followed by no host and ends no password. And a password= query parameter.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/?#@:\s]*):(\S*)@(?=[A-Za-z0-9._~%\-\[\]:,]*(?:[/?#\s]|$))")
_QUERY_PASSWORD = re.compile(r"([?&])password=([^&#\s]*)(&?)")


def redact_url(url: str, mask: str = "") -> str:
    """``url`` (or any text quoting URLs: a command line, a message) with every password replaced by ``mask`` (by
    default removed): the one of ``scheme://user:password@host``, whole even when it holds '@', and a
    ``password=`` query parameter. The rest as given."""
    url = _USERINFO.sub(lambda m: m.group(1) + (f":{mask}" if mask else "") + "@", url)
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + (f"password={mask}{m.group(3)}" if mask else ""), url).rstrip(
        "?&"
    )


def url_password(url: str) -> str | None:
    """The password ``redact_url`` removes from ``url`` (to mask it in a message quoting the URL), or None."""
    m = _USERINFO.search(url) or _QUERY_PASSWORD.search(url)
    return m.group(2) or None if m else None


def without_password(text: str, url: str | None) -> str:
    """``text`` (a driver's message that may quote its connection string) with the password of ``url`` masked,
    and each part of it between '@'s too: a driver that split the password at an '@' quotes the rest as a host."""
    text = redact_url(text, "***")
    password = url_password(url or "")
    for secret in sorted({password, *(password or "").split("@")} - {None}, key=len, reverse=True):
        if len(secret) >= 3:  # a shorter piece would mask every 'p' of the text ("***ostgresql"), not a secret
            text = text.replace(secret, "***")
    return text
