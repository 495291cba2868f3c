"""The knowledge base (`slm kb`): index documents into an embedded store, retrieve with BM25 + dense embeddings
fused by reciprocal rank, answer with numbered citations or abstain, and evaluate it all on a question file."""
