"""BERT-style encoders (BERT, RoBERTa share names) and DistilBERT."""

from prunekit.adapters.base import ModelAdapter


class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    blocks_path = "encoder.layer"
    attention_path = "attention"
    q_proj = "attention.self.query"
    k_proj = "attention.self.key"
    v_proj = "attention.self.value"
    o_proj = "attention.output.dense"
    mlp_in = ("intermediate.dense",)
    mlp_out = "output.dense"


class DistilBertAdapter(ModelAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    blocks_path = "transformer.layer"
    attention_path = "attention"
    q_proj = "attention.q_lin"
    k_proj = "attention.k_lin"
    v_proj = "attention.v_lin"
    o_proj = "attention.out_lin"
    mlp_in = ("ffn.lin1",)
    mlp_out = "ffn.lin2"
