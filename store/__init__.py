"""Embeddings, the question encoder and the Milvus store: the one place that knows Milvus."""
