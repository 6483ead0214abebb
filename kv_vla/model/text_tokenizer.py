"""A small word-level tokenizer for the compact VLA, built locally with the ``tokenizers`` library.

The compact model only ever reads OpenVLA's prompt template and the simulator's instructions, so a
fixed word list is enough and keeps the embedding table tiny. Vocabulary layout:
``[PAD] [UNK] <s> </s>``, the words (lower-cased, in list order), then ``n_action_bins`` action tokens
``<act_0>``.. at the very end, so that the action ids are the last 256 ids as in OpenVLA.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<s>", "</s>")

#: Words of the prompt template and of the simulator's task families (plus common robot verbs).
_WORDS_TEXT = """
    in : what action should the robot take to ? out
    a an the this that these those it its one ones other another same different which who was were is are be
    been first second third last next then and or but not no before after while until when where once again
    at start beginning end earlier later now previously originally shown seen remembered remember cue cued
    lit light lights lamp lamps glowing glowed blinked flashed on off indicator signal marked
    red green blue yellow orange purple pink white black grey gray cyan magenta brown
    cube cubes block blocks box object objects item target targets zone zones area region pad goal bin tray
    marker spot button table plate bowl cup ball sphere
    touch reach push pick place put move lift stack go grasp grab drop release hold open close slide
    press tap visit return come bring carry lower raise
    up down left right front back top bottom near far center centre middle side corner over under onto into
    of with from by for toward towards above below between beside next
    gripper arm hand end effector
    0 1 2 3 4 5 6 7 8 9 . , ; ! ' -
"""
DEFAULT_WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())


def build_word_list(words: Iterable[str]) -> list[str]:
    """Lower-case, de-duplicate (first occurrence wins) and drop the special tokens."""
    seen: dict[str, None] = {}
    for w in words:
        w = w.strip().lower()
        if w and w not in SPECIAL_TOKENS and not w.startswith("<act_"):
            seen.setdefault(w, None)
    return list(seen)


def vocab_size_for(words: Iterable[str], n_action_bins: int = 256) -> int:
    """Total vocabulary size (specials + words + action tokens)."""
    return len(SPECIAL_TOKENS) + len(build_word_list(words)) + n_action_bins


def build_text_tokenizer(words: Iterable[str], n_action_bins: int = 256) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` (WordLevel, lower-casing, BOS prepended) over ``words``.

    Unknown words map to ``[UNK]``; punctuation is split off (``\\w+|[^\\w\\s]+``), newlines vanish.
    """
    word_list = build_word_list(words)
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *word_list, *(f"<act_{i}>" for i in range(n_action_bins))):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    if len(fast) != len(vocab):
        raise RuntimeError(f"tokenizer size {len(fast)} != vocabulary size {len(vocab)}")
    return fast
