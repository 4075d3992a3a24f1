"""What RNTP learns from: streamed sources, tokenizers, chunking, site selection, episodes, the synthetic corpus."""
