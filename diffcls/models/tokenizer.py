"""An offline CLIP tokenizer: byte-level vocabulary, optional word merges, nothing downloaded.

Real SD models ship their CLIP BPE vocabulary; the tiny test models and the bundled demo model
build theirs here. Every byte is a token (so any prompt tokenizes), and `words` adds BPE merges
so that those words become single tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffcls.models.dit import LABELS_FILE, LabelTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _bpe(pieces: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as CLIP applies it: merge the lowest-ranked adjacent pair until none is known."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_tokenizer_files(out_dir: str | Path, words: list[str] = (), max_length: int = 77) -> Path:
    """Write vocab.json/merges.txt (+ tokenizer config) for a CLIP tokenizer into `out_dir`."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    rank: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):  # unique, in order
        # Add merges until BPE, applying every merge so far by rank as the tokenizer will, leaves
        # the word in one piece. (Merging left to right blindly fails when an earlier word's
        # merge splits this one first: "re" from "red" would leave "green" as g|re|e|n.)
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], rank)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            rank[pair] = len(merges)
            merges.append(f"{pair[0]} {pair[1]}")
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _bpe(pieces, rank)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        tok = CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"),
            merges=str(Path(tmp) / "merges.txt"),
            model_max_length=max_length,
        )
        tok.save_pretrained(str(out))
    return out


def build_tokenizer(words: list[str] = (), max_length: int = 77):
    """A CLIPTokenizer object built in a temporary directory."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer_files(tmp, words, max_length)
        return CLIPTokenizer.from_pretrained(tmp)


def load_tokenizer(path: str | Path):
    """A saved tokenizer: a class-conditional model's labels (`id2label.json`) or a CLIP tokenizer."""
    path = Path(path)
    if (path / LABELS_FILE).is_file():
        return LabelTokenizer.from_pretrained(path)
    from diffcls.models.packed import MULTI_FILE, MultiTokenizer

    if (path / MULTI_FILE).is_file():  # SDXL's two, SD3's three tokenizers
        return MultiTokenizer.from_pretrained(path)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))
