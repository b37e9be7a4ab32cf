"""Model shapes for the benchmarks: the config.json fields of real checkpoints that set the cost
(the benchmarks use random weights, so nothing is downloaded)."""

SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=4092, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4),  # ../shared/bench/trl_dpo_bench.py's default
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1e6),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1e6),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True, rope_theta=5e5, rope_scaling={
                             "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
    # Llama 3.2 1B's body with a 32k vocabulary (Llama 2's): 1.04B parameters, so that full fine-tuning
    # of a 1B model (16 bytes per parameter + the reference) fits a 24 GB CPU box for bench/lora.py
    "llama-1b-32k": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True, rope_theta=5e5),
}
