"""Password hashing for admin accounts: argon2id (argon2-cffi, RFC 9106 low-memory profile)."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["hash_password", "needs_rehash", "verify_password"]

_HASHER = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4: about 50 ms per check
_DUMMY = _HASHER.hash("not a password: used to spend the same time on unknown users")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored``; ``stored=None`` spends the same time."""
    try:
        return _HASHER.verify(stored or _DUMMY, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    return _HASHER.check_needs_rehash(stored)
