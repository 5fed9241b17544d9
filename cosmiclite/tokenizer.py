"""The CLIP tokenizer that Stable Diffusion uses, offline (CosmicMan Sec. 4.2 counts token spans in it).

CosmicMan discretizes a caption into groups with token spans (s_i, e_i) in the text encoder's 77-token
sequence. Those indices are only right if they are counted by the very tokenizer the model uses: CLIP's
byte-level BPE (Radford et al. 2021) with 49,408 ids, a start token (49406) in front and an end token
(49407) behind. SD 1.5 pads with the end token; SDXL's second tokenizer pads with "!" (id 0).

The merges come from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, vendored in `assets/` (MIT licence beside
it). The vocabulary is rebuilt exactly as CLIP's own `SimpleTokenizer` does:

    256 byte characters, the same 256 with "</w>" (end of word), one token per merge, then the 2 specials.

and handed to transformers' fast (Rust `tokenizers`) `CLIPTokenizer`, which supplies CLIP's normaliser
(lower-case, whitespace squeeze) and pre-tokeniser, padding, truncation and character offsets.

But: CLIP's original Python tokenizer also runs `ftfy` to repair mojibake; like transformers' fast tokenizer
we skip it (it changes nothing for clean text). A real checkpoint's own tokenizer is loaded with
`load_tokenizer` from a local folder instead of rebuilding it.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from .protocol import ASSETS

BPE_VOCAB = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
MODEL_MAX_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges so that the vocabulary is 49,408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters.

    Why: BPE works on strings, and control bytes or spaces in a vocabulary file would be ambiguous, so
    every byte is given a visible stand-in (printable bytes map to themselves, the rest to chr(256+n)).
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges(path: Path = BPE_VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and merge list, rebuilt from the vendored merges file."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a "#version" header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, f"expected 49,408 CLIP tokens, got {len(vocab)}"
    return vocab, merges


@lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = END):
    """The offline CLIP tokenizer with SD 1.5's ids (built once per process, then shared).

    `tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]`; call it with
    `padding="max_length", truncation=True` for SD's fixed 77 tokens, `return_offsets_mapping=True` for
    character offsets. Treat the returned object as read-only: it is shared by every caller.
    """
    # lazy: transformers takes over a second to import, which `cosmiclite protocol` and the readers of the
    # protocol alone need not pay; CLIPTokenizer is the fast, Rust-backed one in transformers >= 5
    from transformers import CLIPTokenizer  # noqa: PLC0415

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)


def sdxl_tokenizers():
    """SDXL's two tokenizers: the same CLIP BPE, the first padding with <|endoftext|>, the second with "!".

    Why it matters: padded positions differ (49407 vs 0), so code that finds "the end" by looking for
    the pad id breaks on the second; spans of real tokens are identical in both.
    """
    return clip_tokenizer(), clip_tokenizer(pad_token="!")


def load_tokenizer(path_or_id: str | Path, subfolder: str = "tokenizer"):
    """A real checkpoint's own tokenizer (e.g. an SD 1.5 / SDXL / CosmicMan folder), read from disk only.

    `path_or_id` is a local diffusers folder (its `subfolder` holds the tokenizer files; a folder that
    holds them directly works too) or a hub id already in the local Hugging Face cache. Nothing is
    downloaded: this kit runs offline.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415  (lazy, as in clip_tokenizer)

    path = Path(path_or_id).expanduser()
    if path.is_dir():
        where = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        if not any((where / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise FileNotFoundError(
                f"no tokenizer files in {str(where)!r} (expected vocab.json + merges.txt or tokenizer.json"
                f"{f' under the {subfolder!r} subfolder' if subfolder else ''}); pass the checkpoint's folder "
                "or use cosmiclite.tokenizer.clip_tokenizer() for the built-in CLIP tokenizer")
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    if path.exists() or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer folder {str(path_or_id)!r} does not exist; pass an existing "
                                "checkpoint folder or a hub id that is in the local Hugging Face cache")
    try:
        return AutoTokenizer.from_pretrained(str(path_or_id), subfolder=subfolder or "", local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"tokenizer of {str(path_or_id)!r} (subfolder {subfolder!r}) is not in the local Hugging Face "
            "cache and this kit does not download; on a machine with network run "
            f"`huggingface-cli download {path_or_id}` first, pass a local folder, or use "
            f"cosmiclite.tokenizer.clip_tokenizer() (the same ids as SD 1.5). Cause: {e}") from None
