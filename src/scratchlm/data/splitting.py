"""Cutting text into documents of at most ``chunk_chars`` characters at paragraph breaks, in linear time and,
for text that arrives in pieces (a file read in blocks), in memory bounded by a few chunks.

Paragraphs (separated by blank lines) are packed greedily into documents; a paragraph longer than a document
is cut at its last newline within the limit, or anywhere if it has none. A text no longer than the limit is
one document as it is.
"""

from __future__ import annotations

from collections.abc import Iterator


class Splitter:
    """``split_paragraphs`` for text fed in pieces: the same documents as if it had been given whole."""

    def __init__(self, chunk_chars: int) -> None:
        self.chunk = chunk_chars
        self.pending = ""  # the paragraph in progress (no blank line in it yet)
        self.piece: list[str] = []  # paragraphs packed into the next document
        self.size = 0

    def feed(self, text: str) -> Iterator[str]:
        """The documents that ``text``, appended to what came before, completes."""
        self.pending += text
        pos = 0
        while (end := self.pending.find("\n\n", pos)) >= 0:
            yield from self._paragraph(self.pending[pos:end])
            pos = end + 2
        self.pending = self.pending[pos:]
        yield from self._cut_long_pending()

    def finish(self) -> Iterator[str]:
        """The documents left when the text has ended."""
        yield from self._paragraph(self.pending)
        self.pending = ""
        if self.piece and any(p.strip() for p in self.piece):
            yield "\n\n".join(self.piece)
        self.piece, self.size = [], 0

    def _flush(self) -> Iterator[str]:
        if self.piece:
            yield "\n\n".join(self.piece)
            self.piece, self.size = [], 0

    def _cuts(self, para: str, keep: int) -> tuple[list[str], int]:
        """Cut the start of a paragraph longer than a document into documents while more than ``keep``
        characters would remain after the next cut window; returns them and where the rest starts."""
        parts, start = [], 0
        while len(para) - start > self.chunk and start + self.chunk < len(para) - keep:
            cut = para.rfind("\n", start, start + self.chunk)
            cut = cut if cut > start else start + self.chunk
            parts.append(para[start:cut])
            start = cut
            while start < len(para) and para[start] == "\n":
                start += 1
        return parts, start

    def _paragraph(self, para: str) -> Iterator[str]:
        parts, start = self._cuts(para, keep=-1)
        for part in parts:
            yield from self._flush()
            yield part
        para = para[start:] if start else para
        if self.size + len(para) + 2 > self.chunk and self.piece:
            yield from self._flush()
        self.piece.append(para)
        self.size += len(para) + 2

    def _cut_long_pending(self) -> Iterator[str]:
        # A paragraph still arriving that is already longer than a document: its first cuts are already fixed
        # (a cut depends only on the next window), so emit them now. The last character stays, as it may be
        # the first newline of a blank line still to come.
        if len(self.pending) <= 2 * self.chunk:
            return
        parts, start = self._cuts(self.pending, keep=1)
        for part in parts:
            yield from self._flush()
            yield part
        self.pending = self.pending[start:]


def split_paragraphs(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut text into pieces of at most ``chunk_chars`` at blank lines (at newlines, then anywhere, if
    needed)."""
    if len(text) <= chunk_chars:
        yield text
        return
    splitter = Splitter(chunk_chars)
    yield from splitter.feed(text)
    yield from splitter.finish()
