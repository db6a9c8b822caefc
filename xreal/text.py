"""Text conditioning: a WordPiece tokenizer built from label text, and a transformer text encoder.

The method trains its text encoder from scratch together with the UNet, on
prompts made of positive CheXpert labels ("Cardiomegaly Edema"; "" for No
Finding). The encoder is a pre-norm transformer over token and absolute
position embeddings with a final layer norm, the layout of the reference's
BERT-token embedder; the tokenizer is a lowercase BERT-style WordPiece
tokenizer built here with the ``tokenizers`` library from the training text,
so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from xreal.core.labels import CHEXPERT_LABELS

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_tokenizer(texts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A lowercase WordPiece tokenizer whose vocabulary is every word of ``texts`` and of the CheXpert labels.

    Unknown words fall back to single-character pieces. The vocabulary is
    sorted, so the same texts always give the same token ids. Encodes like
    BERT: ``[CLS] tokens [SEP]`` padded with ``[PAD]`` (id 0) to ``max_length``.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for text in (*CHEXPERT_LABELS, *texts):
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({c for word in words for c in word})
    pieces = [
        *SPECIAL_TOKENS,
        *sorted(words),
        *(f"##{c}" for c in characters if c not in words),
        *(c for c in characters if c not in words),
    ]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, head_width: int, ff_mult: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_width
        self.attention_norm = nn.LayerNorm(width)
        self.to_qkv = nn.Linear(width, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, width)
        self.ff_norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.to_qkv(self.attention_norm(x)).view(b, t, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.to_out(attended.transpose(1, 2).reshape(b, t, -1))
        return x + self.ff(self.ff_norm(x))


class XRealTextEncoder(ModelMixin, ConfigMixin):
    """Token ids ``[B, T]`` -> context ``[B, T, width]`` for the UNet's cross-attention.

    ``head_width`` (default ``width // heads``) sets the attention's inner width,
    ``heads * head_width``; the reference attends with 8 heads of 64 at width 1280.
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        max_positions: int = 77,
        width: int = 1280,
        layers: int = 32,
        heads: int = 8,
        ff_mult: int = 4,
        head_width: int | None = None,
    ):
        super().__init__()
        if head_width is None and width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        head_width = head_width or width // heads
        self.blocks = nn.ModuleList(_Block(width, heads, head_width, ff_mult) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)
