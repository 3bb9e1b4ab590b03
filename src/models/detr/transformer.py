"""DETR's encoder-decoder transformer (post-norm, 6 + 6 layers), batch-first, with the official key names.

Encoder layer: self-attention with the position embedding added to queries and keys, then the FFN
(the same layer as D-FINE's encoder, ReLU). Decoder layer: self-attention among the object queries
(query embedding added to queries and keys), cross-attention from the queries to the encoder memory
(position embedding on the keys), FFN; one shared LayerNorm turns every layer's output into what the heads
read. The decoder starts from zeros: the queries differ only through their learned embedding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from src.models.hybrid_encoder import TransformerEncoder, TransformerEncoderLayer


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, memory_keys: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """tgt (B, Q, C), memory (B, L, C), memory_keys = memory + position (B, L, C), query_pos (1, Q, C)."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.multihead_attn(tgt + query_pos, memory_keys, value=memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, memory: torch.Tensor, pos: torch.Tensor, query_embed: torch.Tensor, all_layers: bool
    ) -> torch.Tensor:
        """memory (B, L, C), pos (1, L, C), query_embed (Q, C) -> normalised outputs (layers, B, Q, C):
        every layer's when all_layers (auxiliary losses), else the last one's only."""
        query_pos = query_embed.unsqueeze(0)
        tgt = torch.zeros(memory.shape[0], *query_embed.shape, dtype=memory.dtype, device=memory.device)
        memory_keys = memory + pos
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_keys, query_pos)
            if all_layers:
                outputs.append(self.norm(tgt))
        return torch.stack(outputs) if all_layers else self.norm(tgt).unsqueeze(0)


class Transformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, act="relu")
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, d_model)
        self.d_model = d_model
        for parameter in self.parameters():  # the official initialisation
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, query_embed: torch.Tensor, all_layers: bool
    ) -> torch.Tensor:
        """src (B, L, C) projected features, pos (1, L, C), query_embed (Q, C) -> (layers, B, Q, C)."""
        memory = self.encoder(src, pos)
        return self.decoder(memory, pos, query_embed, all_layers)
