"""LLaMA (transformers ``LlamaForCausalLM``): units are the decoder layers
``model.layers.i``, called ``layer(h, attention_mask=..., position_embeddings=..., position_ids=...)``.

A batch is a LongTensor of token ids (B, T), or a dict with ``input_ids`` and optionally
``attention_mask`` (1 = real token). The stem embeds the tokens and builds the keyword state every
layer needs (the causal mask transformers would build, the rotary position embeddings); the head
is the final RMSNorm and ``lm_head`` (logits). Quantized: every Linear of the decoder layers
(q, k, v, o, gate, up, down); embeddings, norms and ``lm_head`` stay float (the GPTQ reference).
Attention itself is transformers' own (its matmuls are not quantized: no "attention" role).
"""
from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from .base import ModelAdapter, PrecondSite, State, Unit


class LlamaAdapter(ModelAdapter):
    def _decoder(self):
        return self.model.model

    def stem(self, batch):
        ids, mask = (batch["input_ids"], batch.get("attention_mask")) if isinstance(batch, dict) else (batch, None)
        m = self._decoder()
        h = m.embed_tokens(ids)
        position_ids = torch.arange(h.shape[1], device=h.device)[None]
        causal = create_causal_mask(config=m.config, inputs_embeds=h, attention_mask=mask, past_key_values=None,
                                    position_ids=position_ids)
        pe = m.rotary_emb(h, position_ids=position_ids)
        return State(h, {"attention_mask": causal, "position_embeddings": pe, "position_ids": position_ids})

    def units(self):
        return [Unit(f"model.layers.{i}") for i in range(self._decoder().config.num_hidden_layers)]

    def head(self, state):
        return self.model.lm_head(self._decoder().norm(state.h))

    def features(self, state):
        return self._decoder().norm(state.h)

    def float_layers(self):
        return {"lm_head"}

    def trainable_head(self):
        return ["lm_head"]

    def norm_linear_pairs(self):
        pairs = []
        for u in self.units():
            a, b = f"{u.name}.self_attn", f"{u.name}.mlp"
            pairs += [(f"{u.name}.input_layernorm", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]),
                      (f"{u.name}.post_attention_layernorm", [f"{b}.gate_proj", f"{b}.up_proj"])]
        return pairs

    def extra_precond(self, sites):
        """"v_proj": v_proj's output channels -> o_proj's input columns (attention is linear in v);
        only without grouped-query attention (each v channel feeds exactly one o_proj column)."""
        from ..quant.modules import _QuantWeighted

        cfg = self._decoder().config
        if "v_proj" not in sites or getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) != cfg.num_attention_heads:
            return []
        out = []
        for u in self.units():
            v, o = self.get(f"{u.name}.self_attn.v_proj"), self.get(f"{u.name}.self_attn.o_proj")
            if not (isinstance(v, _QuantWeighted) and isinstance(o, _QuantWeighted)):
                continue
            entries = [(v, "weight", 0, 0, True)]
            if v.bias is not None:
                entries.append((v, "bias", 0, 0, True))
            if v.per_channel_weight_scale():
                entries.append((v.w_quant, "scale", 0, 0, True))
            entries.append((o, "weight", 1, 0, False))
            out.append(PrecondSite(f"{u.name}.self_attn.v", "v_proj", v.out_features, entries))
        return out
