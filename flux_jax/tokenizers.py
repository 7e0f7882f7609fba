"""Small offline CLIP and T5 tokenizers, saved in the layout of a FLUX folder's tokenizer/ and tokenizer_2/.

Tiny FLUX pipelines for tests and demos need tokenizers whose ids fit a 1000-token embedding,
and nothing can be downloaded. Both are trained here on a built-in English corpus, keeping
the real vocabularies' structure:

* CLIP (tokenizer/): byte-level BPE with the `</w>` end-of-word suffix; ids are the 256 byte
  symbols, the same with `</w>`, then one id per merge, then `<|startoftext|>` and
  `<|endoftext|>` as the two largest ids (CLIPTextModel configs with eos_token_id 2 pool at the
  argmax id, so eos must be the largest). eos also pads, as in FLUX's tokenizer/.
* T5 (tokenizer_2/): a SentencePiece-style Unigram model with `<pad>` 0, `</s>` 1, `<unk>` 2,
  no sentinel ids, `▁` word-start marking and `</s>` appended.

Training is a few deterministic Python loops (BPE merges; frequency-scored Unigram pieces)
rather than the `tokenizers` trainers, which break ties in hash-map order and so give other ids
in every process. The normaliser, pre-tokeniser and saved files come from transformers' own
CLIPTokenizer and T5Tokenizer classes, so what is trained on is exactly what those classes see
when they load the folder. Needs only `tokenizers` and `transformers`; no sentencepiece.
"""
from __future__ import annotations

import json
import math
import random
import string
from collections import Counter
from pathlib import Path

import numpy as np

DEFAULT_VOCAB_SIZE = 1000

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"  # also unk and pad, as in CLIP-L/14 and FLUX's tokenizer/
CLIP_MAX_LENGTH = 77
CLIP_END_OF_WORD = "</w>"
CLIP_BYTES = 256
CLIP_MERGES_HEADER = "#version: 0.2"  # first line of CLIP's merges.txt; readers skip it

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_SPECIALS = (T5_PAD, T5_EOS, T5_UNK)  # ids 0, 1, 2, as in T5's spiece.model
T5_MAX_LENGTH = 512
T5_MAX_PIECE_LENGTH = 16  # sentencepiece's default max_piece_length
# Characters every T5 vocabulary keeps as pieces, used in the corpus or not, so they never map to unk.
T5_ALPHABET = string.ascii_letters + string.digits + string.punctuation
T5_UNSEEN_COUNT = 1  # pseudo-count for alphabet characters the corpus lacks
# Scores are log-frequencies, so segmentations whose counts multiply alike tie exactly, and Viterbi
# implementations (tokenizers, sentencepiece) break ties differently. A fixed pseudo-random
# jitter, far above float32 resolution yet small next to typical gaps between frequencies,
# removes the ties, so both give the same ids.
T5_SCORE_JITTER = 1e-3
T5_JITTER_SEED = 0

SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # in real FLUX folders; transformers 5 no longer writes it

# Image-prompt-like English: the kind of text these tokenizers see. Digits, contractions and
# punctuation are included so the frequent CLIP pre-tokeniser cases get merges too.
CORPUS: tuple[str, ...] = (
    "A photograph of an astronaut riding a horse on the surface of the moon.",
    "A small red fox sleeping under a tree in the snow, soft morning light.",
    "An oil painting of a quiet harbour at sunset with fishing boats and seagulls.",
    "A cat holding a sign that says hello world, studio photo, sharp focus.",
    "Portrait of an old man with a white beard wearing a wool hat, 35mm film.",
    "A bowl of ramen with eggs, green onions and chili oil on a wooden table.",
    "Watercolor illustration of a lighthouse on a rocky island during a storm.",
    "A futuristic city skyline at night, neon signs reflected in wet streets.",
    "Close-up of a hummingbird drinking from a purple flower, high shutter speed.",
    "A cozy reading corner with a big armchair, a lamp and shelves full of books.",
    "Two children flying a kite on a windy beach in the late afternoon.",
    "A medieval castle on a hill surrounded by fog and dark pine forests.",
    "Isometric 3D render of a tiny coffee shop with plants in the windows.",
    "A golden retriever puppy playing with a blue ball in the green grass.",
    "Macro shot of dew drops on a spider web, blurred background, bokeh.",
    "A vintage red car parked in front of a pastel pink house in Havana.",
    "An astronaut floating inside the space station, earth visible through the window.",
    "A bright kitchen with white tiles, copper pots and fresh bread on the counter.",
    "Snowy mountains reflected in a clear alpine lake, early morning, 4k photo.",
    "A pencil sketch of a ballet dancer in motion, loose and expressive lines.",
    "The word FLUX written in glowing letters on a black chalkboard.",
    "A robot and a girl sitting on a bench, watching the rain in a park.",
    "Aerial view of rice terraces in the mountains, lush green, drone photo.",
    "A steaming cup of tea next to an open notebook and a fountain pen.",
    "A desert road stretching to the horizon under a sky full of stars.",
    "Highly detailed fantasy map of an island kingdom with rivers and villages.",
    "A jellyfish glowing in deep blue water, long thin tentacles, dark ocean.",
    "Street food market in Bangkok at night, crowds, lanterns and smoke.",
    "A minimalist poster of a mountain with the sun, flat colors, vector art.",
    "A knight in shining armor holding a sword in front of a dragon.",
    "An elephant walking across the savanna at dusk, dust in the golden air.",
    "Still life with apples, pears and grapes in a ceramic bowl, classical style.",
    "A train crossing a stone bridge over a river valley in autumn colors.",
    "Neon sign that reads open 24 hours above the door of a small diner.",
    "A polar bear standing on floating ice, cold blue light, wildlife photography.",
    "A child's drawing of a house, a tree and a big yellow sun with crayons.",
    "Cyberpunk samurai with a glowing katana standing in the rain.",
    "A lush tropical garden with palm leaves, orchids and a small waterfall.",
    "Black and white photo of a jazz musician playing the saxophone on stage.",
    "A stack of pancakes with butter, berries and maple syrup, food photography.",
    "The northern lights dancing over a frozen lake and a wooden cabin.",
    "A sailing ship on rough seas, waves crashing, dramatic clouds, oil on canvas.",
    "An owl perched on a branch at night, big yellow eyes, moonlight.",
    "A modern living room with large windows, concrete floor and a grey sofa.",
    "Children's book illustration of a bear and a rabbit having a picnic.",
    "A hot air balloon festival, dozens of colorful balloons over green fields.",
    "Portrait of a young woman with freckles and curly red hair, natural light.",
    "A busy train station in Tokyo during rush hour, long exposure, motion blur.",
    "A treehouse in a giant oak tree with rope ladders and string lights.",
    "Anime style drawing of a boy with spiky hair and a red jacket.",
    "A sunflower field under a blue sky with white fluffy clouds.",
    "Product photo of a pair of white sneakers on a light grey background.",
    "A scientist looking through a microscope in a laboratory, cinematic lighting.",
    "An ancient temple in the jungle covered in vines and moss.",
    "A slice of chocolate cake with a strawberry on top, shallow depth of field.",
    "Paper cut art of a whale swimming through layers of blue waves.",
    "A lonely tree on a hill at sunrise, long shadows, minimal composition.",
    "Two cups of coffee on a cafe table in Paris, the Eiffel tower behind.",
    "A dog wearing sunglasses driving a convertible car along the coast.",
    "Stained glass window showing a peacock with bright blue and green feathers.",
    "A snowman with a carrot nose and a striped scarf in a quiet village.",
    "Underwater photo of a coral reef with clownfish and sea turtles.",
    "A detailed pixel art scene of a farm with cows, chickens and a red barn.",
    "Rainy window with drops of water, city lights blurred in the background.",
    "A wizard reading a glowing book in a tower full of potions and candles.",
    "Fresh vegetables at a farmers market: tomatoes, carrots, peppers and leeks.",
    "A motorcycle parked on a mountain pass with clouds below the road.",
    "Graffiti mural of a tiger on a brick wall in a narrow alley.",
    "The quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9.",
    "It's a beautiful day, isn't it? We'll see what they've done, I'm sure you'd agree.",
    "Numbers like 1024, 768 and 3.14 appear in prompts, as do words like HDR and 8K.",
    "Symbols: @ # $ % & * ( ) [ ] { } < > / \\ | + = - _ ~ ^ ! ? ' \" , . : ;",
)


def _words(backend, corpus) -> Counter:
    """Corpus word counts, as `backend`'s normaliser and pre-tokeniser split the text."""
    counts: Counter = Counter()
    for text in corpus:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return counts


def _write_special_tokens_map(folder: Path, tokens: dict[str, str]) -> None:
    (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- CLIP: byte-level BPE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character map, in CLIP's vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(CLIP_BYTES) if b not in printable]
    # Non-printable bytes are shifted past 255 so every byte gets a visible, unique character.
    return {**{b: chr(b) for b in printable}, **{b: chr(CLIP_BYTES + i) for i, b in enumerate(others)}}


def train_clip_bpe(n_merges: int, corpus=CORPUS) -> list[tuple[str, str]]:
    """The first `n_merges` BPE merges on `corpus`, most frequent pair first (ties: smallest pair).

    Words are split into byte symbols with `</w>` fused to the last one, as CLIP does. A pair
    whose join is already a token (reachable by another merge order) is skipped, so every merge
    adds exactly one vocabulary entry.
    """
    from transformers import CLIPTokenizer

    words = [(tuple(w[:-1]) + (w[-1] + CLIP_END_OF_WORD,), c)
             for w, c in _words(CLIPTokenizer().backend_tokenizer, corpus).items()]
    tokens = set(clip_vocab([])) - {CLIP_BOS, CLIP_EOS}  # the byte symbols, bare and with `</w>`
    pairs: Counter = Counter()
    for word, count in words:
        pairs.update(_pair_counts(word, count))
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        candidates = [p for p, c in pairs.items() if c > 0 and "".join(p) not in tokens]
        if not candidates:
            raise ValueError(f"the corpus allows only {len(merges)} merges, {n_merges} asked")
        best = min(candidates, key=lambda p: (-pairs[p], p))
        merges.append(best)
        tokens.add("".join(best))
        # Only words holding `best` change: swap their old pairs' counts for the merged word's.
        for i, (word, count) in enumerate(words):
            if best in zip(word, word[1:]):
                merged = _merge(word, best)
                pairs.subtract(_pair_counts(word, count))
                pairs.update(_pair_counts(merged, count))
                words[i] = (merged, count)
    return merges


def _pair_counts(word: tuple[str, ...], count: int) -> Counter:
    """Adjacent symbol pairs of `word`, each weighted by the word's corpus count."""
    return Counter({pair: n * count for pair, n in Counter(zip(word, word[1:])).items()})


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`word` with every occurrence of `pair` fused, left to right."""
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: bytes, bytes + `</w>`, one token per merge, then bos and eos last."""
    symbols = list(bytes_to_unicode().values())
    ordered = symbols + [s + CLIP_END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(ordered)}


def write_clip_tokenizer(folder, vocab_size: int = DEFAULT_VOCAB_SIZE, corpus=CORPUS) -> Path:
    """Train a CLIP BPE of `vocab_size` ids (specials included) and save it as FLUX's tokenizer/.

    Writes tokenizer.json and tokenizer_config.json (what transformers 5 saves and loads) plus
    vocab.json, merges.txt and special_tokens_map.json (what the real folder holds and what
    vocab/merges-based CLIP tokenizers read).
    """
    from transformers import CLIPTokenizer

    n_merges = vocab_size - 2 * CLIP_BYTES - 2
    if n_merges < 0:
        raise ValueError(f"a CLIP vocabulary holds at least {2 * CLIP_BYTES + 2} ids, {vocab_size} asked")
    merges = train_clip_bpe(n_merges, corpus)
    vocab = clip_vocab(merges)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    assert len(tok) == vocab_size and tok.eos_token_id == vocab_size - 1, (len(tok), tok.eos_token_id)
    tok.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "\n".join([CLIP_MERGES_HEADER, *(" ".join(m) for m in merges)]) + "\n", encoding="utf-8")
    _write_special_tokens_map(folder, {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS,
                                       "pad_token": CLIP_EOS, "unk_token": CLIP_EOS})
    return folder


# ---------------------------------------------------------------- T5: Unigram


def train_t5_unigram(vocab_size: int, corpus=CORPUS) -> list[tuple[str, float]]:
    """A Unigram vocabulary of `vocab_size` (piece, log-probability) pairs, specials first.

    Every character of the corpus and of T5_ALPHABET is a piece; the other slots go to the
    substrings of `▁`-prefixed words that cover the most text (count x length). Scores are log
    relative frequencies (jittered against ties), so Viterbi prefers long frequent pieces, as a
    trained model does.
    """
    from transformers import T5Tokenizer

    counts: Counter = Counter()
    for word, count in _words(T5Tokenizer(extra_ids=0).backend_tokenizer, corpus).items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + T5_MAX_PIECE_LENGTH) + 1):
                counts[word[i:j]] += count
    chars = sorted({p for p in counts if len(p) == 1} | set(T5_ALPHABET))
    n_long = vocab_size - len(T5_SPECIALS) - len(chars)
    longer = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p] * len(p), p))
    if n_long < 0 or len(longer) < n_long:
        raise ValueError(f"vocab_size {vocab_size} is out of reach: {len(chars)} characters, "
                         f"{len(longer)} longer pieces in the corpus")
    pieces = chars + longer[:n_long]
    freq = {p: counts.get(p, T5_UNSEEN_COUNT) for p in pieces}
    total = sum(freq.values())
    jitter = random.Random(T5_JITTER_SEED)
    # Rounded to float32: what spiece.model can store, so both files hold the very same scores.
    scored = [(p, float(np.float32(math.log(f / total) - T5_SCORE_JITTER * jitter.random())))
              for p, f in freq.items()]
    scored.sort(key=lambda ps: (-ps[1], ps[0]))
    return [(special, 0.0) for special in T5_SPECIALS] + scored


def write_t5_tokenizer(folder, vocab_size: int = DEFAULT_VOCAB_SIZE, corpus=CORPUS) -> Path:
    """Build a T5 Unigram tokenizer of `vocab_size` ids and save it as FLUX's tokenizer_2/ (less spiece.model).

    Writes tokenizer.json, tokenizer_config.json (extra_ids 0: no sentinels, so the vocabulary
    is exactly `vocab_size`) and special_tokens_map.json.
    """
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = T5Tokenizer(vocab=train_t5_unigram(vocab_size, corpus), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    assert len(tok) == vocab_size and [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
    tok.save_pretrained(folder)
    _write_special_tokens_map(folder, {"eos_token": T5_EOS, "pad_token": T5_PAD, "unk_token": T5_UNK})
    return folder
