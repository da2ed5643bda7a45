r"""Textual-inversion embeddings: learned input vectors that a prompt names like a word.

Gal et al. 2022 ("An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion"),
Sec. 3: a new pseudo-word S* is given its own token embedding v* (one or more vectors of the text encoder's input
width), learned with the diffusion loss while every network stays frozen; at sampling time v* stands where the
word's token embedding would. Files hold only v*, and a prompt writes the file's name where S* goes.

Files (`read_embedding`), told apart by their content, never by their name:
  A1111 .pt      a torch pickle {"string_to_param": {"*": (n, D)}, "string_to_token", "name", "step",
                 "sd_checkpoint", "sd_checkpoint_name"} (A1111 modules/textual_inversion Embedding.save; the original
                 textual_inversion code saved string_to_param as an nn.ParameterDict, read here as its parameters).
                 Read by kedavra's restricted unpickler (kedavra.checkpoint.torch_pickle): nothing in it runs.
  A1111 / kohya .safetensors  {"emb_params": (n, D)}.
  diffusers      learned_embeds.bin / .safetensors: {token string: (D,) or (n, D)} (its textual_inversion
                 training script; StableDiffusionPipeline.load_textual_inversion).
  SDXL           .safetensors {"clip_l": (n, 768), "clip_g": (n, 1280)}: clip_l goes to the first text encoder
                 (ViT-L), clip_g to the second (bigG) (A1111 sd_hijack EmbeddingsWithFixes' textual_inversion_key).
The embedding's name is the file stem, as in A1111 (diffusers uses the token string it is given; pass `name`).
Its hash is A1111's "TI hashes" short hash: the first 12 hex digits of the file's SHA-256 (A1111
modules/textual_inversion Embedding.set_hash over modules/hashes.sha256).

`EmbeddingLibrary` (A1111's EmbeddingDatabase) holds the loaded embeddings by name, fills itself from A1111's
`embeddings/` folder (`load_dir`), finds a name in a prompt's tokens (`find`, longest name first, as A1111's
find_embedding_at_position) and gives the hashes for the infotext. How prompts use it: kedavra.pipeline.
prompt_weighting (`chunk_prompt(..., embeddings=library)`, `encode_conditioning(..., embeddings=library)`).

Where this differs from A1111, on purpose: a file that fails to load is reported with its reason (A1111 logs and
goes on; empty files it skips silently); two files may not share a name (A1111 keeps the last read); images holding
embeddings (.png / .webp) are not read; an SDXL embedding on a one-encoder model (and the reverse) is an error.
"""

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kedavra.checkpoint.errors import CheckpointError, _fail
from kedavra.checkpoint.torch_pickle import _restricted_unpickling
from kedavra.checkpoint.weights import read_weights
from kedavra.formats.png_info import sha256_file
from kedavra.networks.tokenizer import PromptFraming
from kedavra.validation import check_int, check_text, some

TI_HASH_LENGTH = 12  # A1111 modules/textual_inversion Embedding.set_hash: shorthash = sha256[0:12]
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")  # what `load_dir` reads (A1111 also reads .png / .webp)
SINGLE = "vectors"  # the key of a one-encoder embedding's vectors
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL files: vectors for text encoder 1 (ViT-L/14) and 2 (bigG/14), in order
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"  # how Gal et al.'s code pickled string_to_param
MODEL_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}  # input width of a one-encoder model's CLIP -> its family


class _PickledModule:
    """Inert stand-in for a pickled nn.ParameterDict: keeps the attributes pickled into it (its `_parameters`), runs
    nothing; the restricted unpickler lets only this class stand for PARAMETER_DICT."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding: `vectors` maps SINGLE (one text encoder) or SDXL_KEYS to float32 (n, D)
    tensors with the same n; `path` and `sha256` when read from a file; A1111's `step` and `sd_checkpoint(_name)`
    (the training model's hash and name) when the file has them."""

    name: str
    vectors: Mapping[str, Tensor]
    path: Path | None = None
    sha256: str | None = None
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"an embedding name must be a str with a visible character, got {self.name!r}")
        keys = set(self.vectors) if isinstance(self.vectors, Mapping) else set()
        if keys != {SINGLE} and not (keys and keys <= set(SDXL_KEYS)):
            raise ValueError(f"embedding {self.name!r}: vectors must map {SINGLE!r} or some of {SDXL_KEYS} to "
                             f"tensors, got keys {sorted(keys)}")
        shapes = {key: tuple(v.shape) if isinstance(v, Tensor) else None for key, v in self.vectors.items()}
        if any(s is None or len(s) != 2 or 0 in s for s in shapes.values()) or len({s[0] for s in shapes.values()}) > 1:
            raise ValueError(f"embedding {self.name!r}: vectors must be (n, D) tensors with one n, got {shapes}")

    @property
    def num_vectors(self) -> int:
        """n: the tokens it takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def short_hash(self) -> str | None:
        """A1111's "TI hashes" value: the file's SHA-256, first TI_HASH_LENGTH hex digits (None without a file)."""
        return None if self.sha256 is None else self.sha256[:TI_HASH_LENGTH]

    @property
    def is_sdxl(self) -> bool:
        return SINGLE not in self.vectors

    def describe(self) -> str:
        """Its vectors in words: "2 vectors of width 768", "1 vector of clip_l width 768, clip_g width 1280"."""
        widths = ", ".join(f"{'' if key == SINGLE else key + ' '}width {v.shape[1]}" for key, v in self.vectors.items())
        return f"{self.num_vectors} vector{'s' if self.num_vectors > 1 else ''} of {widths}"

    def vectors_for(self, index: int, widths: Sequence[int]) -> Tensor:
        """The (n, D) vectors for text encoder `index` of a model whose encoders take `widths` (SDXL: clip_l for 0,
        clip_g for 1); ValueError, naming both widths, when they do not fit that model (`check_fits`)."""
        check_fits(self, widths)
        return self.vectors[SINGLE if len(widths) == 1 else SDXL_KEYS[index]]


def check_fits(embedding: Embedding, widths: Sequence[int]) -> None:
    """ValueError naming the embedding when its vectors do not fit a model whose text encoders take `widths` (one
    width, or SDXL's two), with a guess at what happened."""
    name, widths = embedding.name, tuple(widths)
    if len(widths) == 1:
        width = widths[0]
        if embedding.is_sdxl:
            raise ValueError(f"embedding {name!r} is an SDXL embedding ({embedding.describe()}); this model has one "
                             f"text encoder, of width {width}{_guess('SDXL', MODEL_FAMILIES.get(width))}")
        got = embedding.vectors[SINGLE].shape[1]
        if got != width:
            raise ValueError(f"embedding {name!r} has vectors of width {got}, this model's text encoder takes "
                             f"{width}{_guess(MODEL_FAMILIES.get(got), MODEL_FAMILIES.get(width))}")
        return
    if len(widths) != len(SDXL_KEYS):
        raise ValueError(f"textual-inversion embeddings serve one or two text encoders; this model has {len(widths)}")
    if not embedding.is_sdxl:
        got = embedding.vectors[SINGLE].shape[1]
        raise ValueError(f"embedding {name!r} has vectors of width {got} for one text encoder; this model has two "
                         f"(widths {widths[0]} and {widths[1]}) and needs SDXL's {' and '.join(SDXL_KEYS)} vectors"
                         f"{_guess(MODEL_FAMILIES.get(got), 'SDXL')}")
    for index, (key, width) in enumerate(zip(SDXL_KEYS, widths, strict=True)):
        if key not in embedding.vectors:
            raise ValueError(f"embedding {name!r} has no {key} vectors, which this model's text encoder {index + 1} "
                             f"(width {width}) needs; it has {' and '.join(embedding.vectors)}")
        got = embedding.vectors[key].shape[1]
        if got != width:
            raise ValueError(f"embedding {name!r} has {key} vectors of width {got}, this model's text encoder "
                             f"{index + 1} takes {width}")


def _guess(embedding_family: str | None, model_family: str | None) -> str:
    """" (an SD 1.x embedding on an SD 2.x model?)" when both families are known and differ, else ""."""
    if embedding_family is None or model_family is None or embedding_family == model_family:
        return ""
    return f" (an {embedding_family} embedding on an {model_family} model?)"


# ---- Reading files ----------------------------------------------------------------------------------------------


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """The embedding in one file of any format above, named `name` (default: the file stem, as A1111 names it).
    A file that is no embedding is a CheckpointError naming the file and the keys it has."""
    path = Path(path)
    name = path.stem if name is None else check_text("embedding name", name)
    content = _read_content(path)
    step, checkpoint, checkpoint_name = (content.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name"))
    return Embedding(name, _vectors(path, content), path, sha256_file(path),
                     step if isinstance(step, int) and not isinstance(step, bool) else None,
                     checkpoint if isinstance(checkpoint, str) else None,
                     checkpoint_name if isinstance(checkpoint_name, str) else None)


def _read_content(path: Path) -> dict:
    """The file's top-level dict: a torch pickle (zip or legacy) through the restricted unpickler, which lets
    PARAMETER_DICT through as an inert _PickledModule; anything else through kedavra.checkpoint's weights reader
    (safetensors, or an error saying what the file is)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as file:
        head = file.read(4)
    zipped = head.startswith(b"PK\x03\x04")
    if not zipped and head[:1] != b"\x80":  # not a torch zip, not a legacy pickle (protocol 2+)
        return read_weights(path).tensors
    # An open file, not the path: torch.load hands a path ending in .safetensors to the safetensors reader.
    with _restricted_unpickling(path, zipped, stand_ins=((_PickledModule, PARAMETER_DICT),)), open(path, "rb") as file:
        content = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(content, dict):
        raise _fail(path, f"a torch file holding a {type(content).__name__}, not a textual-inversion embedding")
    return content


def _vectors(path: Path, content: dict) -> dict[str, Tensor]:
    """{SINGLE: (n, D)} or {"clip_l": ..., "clip_g": ...} from a file's dict, told by its keys."""
    keys = list(content)
    if "string_to_param" in content:  # A1111 .pt (Gal et al.'s format)
        params = content["string_to_param"]
        params = getattr(params, "_parameters", params)  # a pickled nn.ParameterDict keeps its tensors there
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise _fail(path, f"string_to_param must hold one term ('*'), got {count}")
        ((term, tensor),) = params.items()
        return {SINGLE: _as_vectors(path, f"string_to_param[{term!r}]", tensor)}
    if keys and set(keys) <= set(SDXL_KEYS):  # SDXL
        vectors = {key: _as_vectors(path, key, content[key]) for key in SDXL_KEYS if key in content}
        counts = {key: v.shape[0] for key, v in vectors.items()}
        if len(set(counts.values())) > 1:
            raise _fail(path, f"the SDXL vectors differ in count: {counts}")
        return vectors
    if len(keys) == 1 and isinstance(content[keys[0]], Tensor):  # A1111 / kohya emb_params, diffusers {token: v}
        return {SINGLE: _as_vectors(path, keys[0], content[keys[0]])}
    raise _fail(path, f"not a textual-inversion embedding: it has {len(keys)} keys ({some(sorted(map(str, keys)))}); "
                      f"an embedding holds 'string_to_param' (A1111 .pt), 'emb_params' (A1111 .safetensors), "
                      f"'clip_l' and 'clip_g' (SDXL) or one token's tensor (diffusers learned_embeds)")


def _as_vectors(path: Path, key: str, tensor) -> Tensor:
    """A float32 (n, D) copy of one embedding tensor; a (D,) vector is one token, (1, D)."""
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise _fail(path, f"{key} must be a floating-point tensor of vectors, got {kind}")
    if tensor.ndim == 1:
        tensor = tensor[None]  # (D,) -> (1, D)
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise _fail(path, f"{key} must be (vectors, width) or (width,), got shape {tuple(tensor.shape)}")
    vectors = tensor.detach().to(torch.float32, copy=True)  # a copy: the file's mapping is not kept
    if not vectors.isfinite().all():
        raise _fail(path, f"{key} holds values that are not finite")
    return vectors


# ---- The library ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What `EmbeddingLibrary.load_dir` did: the names it loaded, and each file it could not load with why."""

    loaded: tuple[str, ...]
    failed: dict[Path, str] = field(default_factory=dict)


class EmbeddingLibrary(Mapping[str, Embedding]):
    """The textual-inversion embeddings a model's prompts may name, by name (A1111 modules/textual_inversion
    EmbeddingDatabase): a read-only mapping name -> Embedding, filled by `add`, `load` and `load_dir`.

    widths: the model's text-encoder input widths (SD 1.x (768,), SD 2.x (1024,), SDXL (768, 1280)); with them an
    embedding that does not fit is refused when added, without them when a prompt uses it. Names are unique, also
    ignoring case (CLIP's tokenizer lower-cases prompts, so "Foo" and "foo" read the same).
    """

    def __init__(self, widths: Sequence[int] | None = None):
        if widths is not None:
            widths = tuple(check_int(f"widths[{i}]", w, 1) for i, w in enumerate(widths))
            check_int("number of text-encoder widths", len(widths), 1, len(SDXL_KEYS))
        self.widths = widths
        self._embeddings: dict[str, Embedding] = {}
        self._lookups: dict[int, tuple[PromptFraming, dict]] = {}  # id(tokenizer) -> (tokenizer, first id -> names)

    def __getitem__(self, name: str) -> Embedding:
        return self._embeddings[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._embeddings)

    def __len__(self) -> int:
        return len(self._embeddings)

    def add(self, embedding: Embedding) -> Embedding:
        """Hold `embedding`; ValueError when its name is taken or (with `widths`) its vectors do not fit."""
        if not isinstance(embedding, Embedding):
            raise TypeError(f"EmbeddingLibrary.add takes an Embedding, got {type(embedding).__name__}")
        clash = next((n for n in self._embeddings if n.lower() == embedding.name.lower()), None)
        if clash is not None:
            where = f" (from {self._embeddings[clash].path})" if self._embeddings[clash].path else ""
            raise ValueError(f"embedding name {embedding.name!r} is already taken by {clash!r}{where}; names are "
                             "unique, ignoring case")
        if self.widths is not None:
            check_fits(embedding, self.widths)
        self._embeddings = dict(sorted({**self._embeddings, embedding.name: embedding}.items(),
                                       key=lambda item: item[0].lower()))  # A1111 lists them by lower-cased name
        self._lookups.clear()
        return embedding

    def load(self, path: str | os.PathLike, name: str | None = None) -> Embedding:
        """`read_embedding(path, name)`, added."""
        return self.add(read_embedding(path, name))

    def load_dir(self, folder: str | os.PathLike) -> LoadReport:
        """Add every EMBEDDING_SUFFIXES file in `folder` and its subfolders (A1111's embeddings/ folder), in path
        order; a file that fails (unreadable, not an embedding, a taken name, vectors that do not fit) is reported
        in the LoadReport with its reason and the others still load."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder of embeddings")
        files = sorted(Path(root, name) for root, _, names in os.walk(folder, followlinks=True) for name in names
                       if name.lower().endswith(EMBEDDING_SUFFIXES))
        loaded, failed = [], {}
        for path in files:
            try:
                loaded.append(self.load(path).name)
            except (CheckpointError, ValueError, OSError) as error:  # CheckpointError is a ValueError: said for clarity
                failed[path] = str(error)
        return LoadReport(tuple(loaded), failed)

    def remove(self, name: str) -> Embedding:
        """Drop the embedding `name` (KeyError naming the held ones when there is none)."""
        if name not in self._embeddings:
            raise KeyError(f"no embedding named {name!r}; held: {some(self._embeddings) or 'none'}")
        self._lookups.clear()
        return self._embeddings.pop(name)

    def hashes(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """{name: A1111 short hash} of `names` (default: all) that were read from a file."""
        embeddings = self._embeddings.values() if names is None else [self[name] for name in names]
        return {e.name: e.short_hash for e in embeddings if e.short_hash is not None}

    def ti_hashes(self, names: Sequence[str]) -> str:
        """A1111's infotext value "TI hashes" for the embeddings a generation used: "name: hash, name: hash" with
        ':' and ',' taken out of names (A1111 sd_hijack_clip.forward); "" when none has a hash."""
        return ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}"
                         for name, short in self.hashes(names).items())

    def find(self, tokenizer: PromptFraming, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens (by `tokenizer`) start at tokens[position], the longest such name, and
        how many tokens it spans; None when no name starts there (A1111's find_embedding_at_position)."""
        for ids, embedding in self._lookup(tokenizer).get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def _lookup(self, tokenizer: PromptFraming) -> dict[int, list[tuple[tuple[int, ...], Embedding]]]:
        """{first token id: [(name's ids, embedding), longest first]} for `tokenizer`, built once per tokenizer."""
        cached = self._lookups.get(id(tokenizer))
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        table: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        spelled: dict[tuple[int, ...], str] = {}
        for embedding in self._embeddings.values():
            ids = tuple(tokenizer.encode(embedding.name))
            if not ids:
                continue  # a name the tokenizer drops entirely cannot be written in a prompt
            if ids in spelled:
                raise ValueError(f"embeddings {spelled[ids]!r} and {embedding.name!r} read as the same tokens in a "
                                 "prompt; rename one")
            spelled[ids] = embedding.name
            table.setdefault(ids[0], []).append((ids, embedding))
        for candidates in table.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)  # longest name first
        self._lookups[id(tokenizer)] = (tokenizer, table)  # holding the tokenizer keeps its id from being reused
        return table
