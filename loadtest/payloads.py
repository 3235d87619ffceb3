"""Request payloads: the shipped photos, sealed per request so every envelope has a fresh nonce.

Sealing per request (not once up front) keeps the load honest: the server never sees
a replayed envelope, and the client pays the same AES-GCM cost a real client pays.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

from clients import samples
from rtinfer import envelope

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "grace_hopper")


@lru_cache(maxsize=None)
def photos(names: tuple[str, ...] = PHOTOS) -> tuple[bytes, ...]:
    """JPEG bytes of the shipped photos, encoded once per process."""
    return tuple(samples.photo(n) for n in names)


class Sealer:
    """Cycles through the photos and seals each one for one request."""

    def __init__(self, key: bytes, *, key_id: str, client_id: str, pipeline: str, names=PHOTOS, start: int = 0):
        self.key, self.key_id, self.client_id, self.pipeline = key, key_id, client_id, pipeline
        images = photos(tuple(names))
        self._cycle = itertools.islice(itertools.cycle(images), start % len(images), None)

    def next(self) -> bytes:
        return envelope.seal(next(self._cycle), self.key, key_id=self.key_id, client_id=self.client_id,
                             pipeline=self.pipeline)
