"""How repetitive generated text is: exact duplicates, near duplicates (MinHash LSH), common openings."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter

from datasketch import MinHash, MinHashLSH

SHINGLE = 5  # word 5-grams
NEAR_THRESHOLD = 0.8  # estimated Jaccard similarity above which two texts count as near duplicates
WORDS = re.compile(r"\w+")


class DiversityMeter:
    """Streaming counts over generated texts; thread-safe, so the feed's producer and /metrics can share
    one."""

    def __init__(self, num_perm: int = 128) -> None:
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=num_perm)
        self.hashes: set[bytes] = set()
        self.openings: Counter = Counter()
        self.total = self.exact = self.near = 0
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        words = WORDS.findall(text.lower())
        digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
        m = MinHash(num_perm=self.num_perm)
        for i in range(max(1, len(words) - SHINGLE + 1)):
            m.update(" ".join(words[i : i + SHINGLE]).encode())
        with self._lock:
            self.total += 1
            self.openings[" ".join(words[:3])] += 1
            if digest in self.hashes:
                self.exact += 1
                return
            self.hashes.add(digest)
            if self.lsh.query(m):
                self.near += 1
            self.lsh.insert(str(self.total), m)

    def summary(self) -> dict:
        with self._lock:
            top, count = self.openings.most_common(1)[0] if self.openings else ("", 0)
            n = max(1, self.total)
            return {"texts": self.total, "exact_duplicate_rate": self.exact / n,
                    "near_duplicate_rate": (self.exact + self.near) / n,
                    "top_opening": top, "top_opening_share": count / n}
