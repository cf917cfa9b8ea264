"""Lumen-MoE configuration.

The configuration class of a small decoder-only Mixture-of-Experts family whose classes are not
part of transformers: a model directory ships this file and `modeling_lumen_moe.py` beside its
weights and names them in config.json's `auto_map`, so that loaders run them only with
`trust_remote_code=True`. moedsl's tests use it as such a family.
"""

from transformers import PretrainedConfig


class LumenMoeConfig(PretrainedConfig):
    """Sizes of a Lumen-MoE decoder.

    The first `first_k_dense_replace` decoder layers have a dense MLP; every later layer has a
    sparse MoE block: a linear router over `num_experts` routed experts (top `num_experts_per_tok`,
    softmax scores renormalized over the chosen ones when `norm_topk_prob`), whose gate/up and
    down projections are stored fused across experts, plus one shared expert every token passes.
    """

    model_type = "lumen_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=768,
        shared_expert_intermediate_size=1536,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=64,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
