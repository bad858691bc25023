"""Shared SSD core: sampling, exact verification, fan-out, speculation cache, KV, models, engine.

Glossary (used in code, protos, metrics and logs):
  target_probs   the target's processed distributions over the K+1 verify positions [B, K+1, V]
  draft_probs    the distribution each draft token was actually sampled from (after temperature,
                 top-k/top-p and Saguaro reshaping) [B, K, V]; None means a point mass on the token
  lookahead (K)  draft tokens per speculation
  num_accepted   k in 0..K, accepted draft tokens in a round
  bonus_token    t*, the token sampled by the verifier after the accepted ones
  num_emitted    num_accepted + 1 tokens committed per round
  OutcomeKey     (seq_id, round, num_accepted, bonus_token): a speculation cache key
  fan_out        F_k, bonus candidates pre-drafted for acceptance length k (list of K+1)
  mean_accepted_length  mean num_emitted per verification round (tokens per round)
"""
