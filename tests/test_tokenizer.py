"""The offline CLIP tokenizer gives Stable Diffusion's own ids (the spans of Sec. 4.2 are counted in them)."""
import hashlib
from functools import lru_cache

import pytest
import regex

from cosmiclite.tokenizer import (
    BPE_VOCAB,
    bytes_to_unicode,
    clip_tokenizer,
    clip_vocab_and_merges,
    load_tokenizer,
    sdxl_tokenizers,
)

# ids printed by SD 1.5's own tokenizer (openai/clip-vit-large-patch14) for these prompts
KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
    "hello world": [49406, 3306, 1002, 49407],
}


def test_vendored_vocab_is_openais_file():
    # sha256 of bpe_simple_vocab_16e6.txt.gz as shipped by openai/CLIP and open_clip
    digest = hashlib.sha256(BPE_VOCAB.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (BPE_VOCAB.parent / "LICENSE-open_clip-bpe.txt").is_file()


def test_vocab_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab[",</w>"] == 267
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(set(bytes_to_unicode().values())) == 256


@pytest.mark.parametrize("text", KNOWN)
def test_known_sd_ids(text):
    assert clip_tokenizer()(text).input_ids == KNOWN[text]


def test_built_once():
    assert clip_tokenizer() is clip_tokenizer()


# --- an independent reference: CLIP's SimpleTokenizer BPE, written out in plain Python -----------------------
@lru_cache(maxsize=None)
def _vocab_and_ranks():
    vocab, merges = clip_vocab_and_merges()
    return vocab, {m: i for i, m in enumerate(merges)}


def _reference_ids(text):
    """openai/CLIP simple_tokenizer.py's algorithm (minus ftfy): regex pre-tokens, byte chars, BPE merges."""
    (vocab, ranks), b2u = _vocab_and_ranks(), bytes_to_unicode()
    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
    ids = [49406]
    for token in pat.findall(" ".join(text.split()).lower()):
        word = [b2u[b] for b in token.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids += [vocab[w] for w in word]
    return ids + [49407]


@pytest.mark.parametrize("text", [
    *KNOWN,
    "A full-body shot, an adult female, fit, small road with trees, straight red above-chest hair.",
    "short plaid cotton skirt in pleated shape, black leather ankle oxford shoes",
    "She's wearing a T-SHIRT   and jeans!! 1980s style, 3/4 sleeves",
    "café naïve Zürich — 東京 😀 ümlaut",
    "tank-top, v-neck, a-line, low-top, clear-lens",
])
def test_matches_reference_bpe(text):
    assert clip_tokenizer()(text).input_ids == _reference_ids(text)


def test_padding_and_truncation_as_sd():
    tok = clip_tokenizer()
    ids = tok("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[:7] == KNOWN["a photo of a cat"] and set(ids[7:]) == {49407}
    long = tok("cat " * 100, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407 and long[1:-1] == [2368] * 75
    assert tok.model_max_length == 77


def test_offsets_point_at_the_words():
    text = "A full-body shot, straight RED hair."
    enc = clip_tokenizer()(text, return_offsets_mapping=True)
    toks = clip_tokenizer().convert_ids_to_tokens(enc.input_ids)
    for t, (a, b) in zip(toks[1:-1], enc.offset_mapping[1:-1]):
        assert text[a:b].lower() == t.replace("</w>", "")


def test_sdxl_pair_pads_differently():
    tok, tok2 = sdxl_tokenizers()
    a = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    b = tok2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert a[:7] == b[:7] == KNOWN["a photo of a cat"]
    assert set(a[7:]) == {49407} and set(b[7:]) == {0}
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0


def test_load_tokenizer_from_a_checkpoint_folder(tmp_path):
    clip_tokenizer().save_pretrained(tmp_path / "ckpt" / "tokenizer")
    tok = load_tokenizer(tmp_path / "ckpt")  # a diffusers folder: the tokenizer is in its subfolder
    assert tok("a photo of a cat").input_ids == KNOWN["a photo of a cat"]
    assert tok.model_max_length == 77


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty" / "tokenizer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not download"):
        load_tokenizer("cosmiclite-test/no-such-model")
