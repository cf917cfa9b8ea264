"""Lumen-MoE modeling code, as a model repository ships it beside its weights.

A decoder-only transformer: RMSNorm, rotary grouped-query attention, a dense SwiGLU MLP in the
first `first_k_dense_replace` layers and a sparse MoE block in the others. The MoE block's
router is a plain linear layer; the routed experts keep their weights fused across experts
(`gate_up_proj` [E, 2·I, H] with gate rows first, `down_proj` [E, H, I]); a shared expert runs
on every token and is added to the routed output. Checkpoints store the tensors under these
runtime names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lumen_moe import LumenMoeConfig


class LumenMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class LumenMoeRotaryEmbedding(nn.Module):
    def __init__(self, config: LumenMoeConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None):
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.base**exponents)

    @torch.no_grad()
    def forward(self, x, position_ids):
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float().to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LumenMoeAttention(nn.Module):
    def __init__(self, config: LumenMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out)


class LumenMoeMLP(nn.Module):
    def __init__(self, config: LumenMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LumenMoeExperts(nn.Module):
    """The routed experts, their weights fused across experts."""

    def __init__(self, config: LumenMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.intermediate_size = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, self.intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [T, H]; top_k_index, top_k_weights [T, k] -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).sum(dim=1)  # [T, E]
        for expert in hit.sum(0).nonzero().flatten().tolist():
            token, slot = torch.where(top_k_index == expert)
            x = hidden_states[token]
            gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out


class LumenMoeSparseBlock(nn.Module):
    def __init__(self, config: LumenMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = LumenMoeExperts(config)
        self.shared_expert = LumenMoeMLP(config, config.shared_expert_intermediate_size)

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        scores = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        routed = self.experts(x, top_k_index, top_k_weights.to(x.dtype))
        return (routed + self.shared_expert(x)).reshape(batch, seq, hidden)


class LumenMoeDecoderLayer(nn.Module):
    def __init__(self, config: LumenMoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LumenMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LumenMoeAttention(config, layer_idx)
        self.post_attention_layernorm = LumenMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = LumenMoeMLP(config, config.intermediate_size)
        else:
            self.mlp = LumenMoeSparseBlock(config)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class LumenMoePreTrainedModel(PreTrainedModel):
    config_class = LumenMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LumenMoeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LumenMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LumenMoeRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))


class LumenMoeModel(LumenMoePreTrainedModel):
    def __init__(self, config: LumenMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LumenMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LumenMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LumenMoeRotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=inputs_embeds.device).unsqueeze(0).expand(batch, -1)
        # additive mask [B, 1, T, T]: causal, and padding where `attention_mask` is 0
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=inputs_embeds.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, attention_mask=mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


class LumenMoeForCausalLM(LumenMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LumenMoeConfig):
        super().__init__(config)
        self.model = LumenMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)
