"""What a quant costs: reference logits, PPL/KLD/top-1 as llama-perplexity --kl-divergence defines them, the
torch and llama.cpp backends, and the report and plot."""
